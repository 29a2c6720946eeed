"""Find a tritonserver binary and prepare the backends and environment it needs."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import TritonNotFoundError

log = logging.getLogger(__name__)

NGC_BINARY = Path("/opt/tritonserver/bin/tritonserver")
NGC_BACKENDS = Path("/opt/tritonserver/backends")
ADMIN_KEY_SHIM_SOURCE = Path(__file__).with_name("admin_key_shim.c")


@dataclass(frozen=True)
class TritonInstallation:
    """A runnable tritonserver: the binary, its backend folder and extra environment.

    `admin_key_shim`: the compiled `admin_key_shim.c` (LD_PRELOAD) that lets the admin key travel in the
    environment instead of on the command line; None where no C compiler was found.
    """

    binary: Path
    backend_directory: Path | None
    env: dict[str, str] = field(default_factory=dict)
    source: str = ""
    admin_key_shim: Path | None = None

    def environment(self) -> dict[str, str]:
        """The process environment to start tritonserver with."""
        env = dict(os.environ)
        for key, value in self.env.items():
            env[key] = f"{value}:{env[key]}" if key in {"PATH", "LD_LIBRARY_PATH"} and env.get(key) else value
        return env


def find_triton(explicit: Path | None, workdir: Path) -> TritonInstallation:
    """Locate tritonserver: `explicit`, then `TRITONSERVER_PATH`, the NGC container, the nvidia-pytriton wheel.

    For the wheel, a Python-backend folder is assembled under `workdir` with the stub built for
    the running Python, and the environment puts this interpreter's `bin/` first on PATH so the
    stub imports the project's numpy and onnxruntime. The admin-key shim is compiled into `workdir`.
    """
    installation = _find_binary(explicit, workdir)
    return dataclasses.replace(installation, admin_key_shim=_admin_key_shim(workdir))


def _find_binary(explicit: Path | None, workdir: Path) -> TritonInstallation:
    for source, candidate in (("explicit path", explicit), ("TRITONSERVER_PATH", _env_path("TRITONSERVER_PATH"))):
        if candidate is not None:
            if not (candidate.is_file() and os.access(candidate, os.X_OK)):
                raise TritonNotFoundError(f"{source} {candidate} is not an executable tritonserver binary")
            backends = candidate.parent.parent / "backends"
            return TritonInstallation(candidate, backends if backends.is_dir() else None, _python_env(), source)
    if NGC_BINARY.is_file():
        return TritonInstallation(NGC_BINARY, NGC_BACKENDS, _python_env(), "NGC container")
    return _from_wheel(workdir)


def _admin_key_shim(workdir: Path) -> Path | None:
    """`admin_key_shim.c` compiled into `workdir` (again when the source is newer); None without a C compiler."""
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    target = workdir / "admin_key_shim.so"
    if target.is_file() and target.stat().st_mtime >= ADMIN_KEY_SHIM_SOURCE.stat().st_mtime:
        return target
    if compiler is None:
        log.info("no C compiler: the admin key goes on tritonserver's command line (see server/admin_key_shim.c)")
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    command = [compiler, "-Wall", "-Wextra", "-Werror", "-O2", "-shared", "-fPIC", "-o", str(partial),
               str(ADMIN_KEY_SHIM_SOURCE), "-ldl"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise TritonNotFoundError(f"compiling {ADMIN_KEY_SHIM_SOURCE} failed: {result.stderr.strip()[:500]}")
    partial.replace(target)
    return target


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _python_env() -> dict[str, str]:
    return {"PATH": str(Path(sys.executable).parent)}


def _from_wheel(workdir: Path) -> TritonInstallation:
    try:
        import pytriton
    except ImportError:
        pytriton = None
    root = Path(pytriton.__file__).parent / "tritonserver" if pytriton else None
    binary = root / "bin" / "tritonserver" if root else None
    if binary is None or not binary.is_file():
        raise TritonNotFoundError(
            "no tritonserver found: install the project (`pip install -c constraints.txt -e .` brings the "
            "nvidia-pytriton wheel), set TRITONSERVER_PATH, or pass --triton-binary"
        )
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonNotFoundError(f"the nvidia-pytriton wheel has no Python-backend stub for Python {version} ({stub})")
    backends = workdir / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in [*(root / "backends" / "python").glob("*.*"), stub]:
        dst = python_dir / src.name
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    ld_path = f"{libs}:{sysconfig.get_config_var('LIBDIR')}"
    env = {**_python_env(), "LD_LIBRARY_PATH": ld_path}
    log.debug("using tritonserver from the nvidia-pytriton wheel at %s", binary)
    return TritonInstallation(binary, backends, env, "nvidia-pytriton wheel")
