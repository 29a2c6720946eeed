"""Start, watch and stop a real tritonserver process."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from server.errors import PortInUseError, TritonStartError
from server.installation import TritonInstallation
from server.settings import TritonSettings

log = logging.getLogger(__name__)


class TritonServer:
    """One tritonserver process in its own process group (so its stub processes go with it).

    Use as a context manager, or call `start()` and `stop()`; `stop()` sends SIGTERM, lets
    in-flight requests finish within `exit_timeout_s`, then kills whatever is left of the group.
    """

    def __init__(self, settings: TritonSettings, installation: TritonInstallation, log_path: Path) -> None:
        if installation.backend_directory is not None and settings.backend_directory is None:
            settings = settings.model_copy(update={"backend_directory": installation.backend_directory})
        self.settings = settings
        self.installation = installation
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        return [str(self.installation.binary), *self.settings.to_args()]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout_s: float = 60.0, models: Iterable[str] = ()) -> TritonServer:
        """Start tritonserver and wait until it (and `models`) are ready, or raise TritonStartError."""
        s = self.settings
        ensure_ports_free(s.host, {"gRPC": s.grpc_port, "HTTP": s.http_port, "metrics": s.metrics_port})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")
        log.info("starting %s %s (log: %s)", self.installation.binary, " ".join(s.to_args(redact=True)), self.log_path)
        try:
            self._proc = subprocess.Popen(
                self.command, env=self.installation.environment(), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log_file.close()
        try:
            self.wait_ready(timeout_s, models)
        except BaseException:
            self.stop()
            raise
        log.info("Triton ready: gRPC %s, HTTP %s, metrics %s", s.grpc_url, s.http_url, s.metrics_url)
        return self

    def wait_ready(self, timeout_s: float, models: Iterable[str] = ()) -> None:
        """Poll `/v2/health/ready` and each model's ready endpoint until all answer 200."""
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {self._proc.returncode} during start-up; "
                    f"last log lines:\n{self.log_tail()}"
                )
            if all(self._http_ok(p) for p in paths):
                return
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"Triton was not ready after {timeout_s:.0f}s ({', '.join(paths)}); last log lines:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> int:
        """Block until the server exits; returns its exit code."""
        if self._proc is None:
            return 0
        return self._proc.wait()

    def stop(self) -> None:
        """SIGTERM, wait for a graceful exit, then SIGKILL the whole process group."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.settings.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not exit in time; killing it")
        _kill_group(proc.pid)
        proc.wait()
        log.info("Triton stopped (exit code %s)", proc.returncode)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _http_ok(self, path: str) -> bool:
        url = f"http://{self.settings.http_url}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def __enter__(self) -> TritonServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_ports_free(host: str, ports: dict[str, int]) -> None:
    """Raise PortInUseError naming every taken port and how to choose others."""
    taken = []
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                taken.append(f"{name} port {port}")
    if taken:
        raise PortInUseError(
            f"{', '.join(taken)} already in use on {host}: stop the process holding it "
            "(is another Triton running?) or pick free ports with --grpc-port/--http-port/--metrics-port"
        )


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
