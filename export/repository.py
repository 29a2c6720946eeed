"""The Triton model repository on disk: atomic version folders and config files."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from export.errors import RepositoryError
from export.triton_config import render

log = logging.getLogger(__name__)

METADATA_FILE = "treeops.json"
FEATURES_FILE = "feature_spec.json"
PARITY_FILE = "parity.json"
CONFIG_FILE = "config.pbtxt"
#: `<model>` + this: the folder and Triton model name of the challenger copy the loop's gate loads beside `<model>`
#: for its SLO run (retraining/gate.py); a loop killed meanwhile leaves it (registry/consistency.py reports it).
GATE_SUFFIX = "-gate"
#: Hidden folders a writer owns while it works: `.staging-<version>-<pid>-<hex>` (a version being
#: written, or after a replace the old one being deleted) and `.trash-<version>-<pid>-<hex>` (a pruned one).
#: Triton ignores them.
_WORK_FOLDER = re.compile(r"^\.(staging|trash)-\d+-(\d+)-[0-9a-f]+$")
_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically
_AT_FDCWD = -100


class VersionConflictError(RepositoryError):
    """A version is already in the repository as another artifact (another target or raw_inputs)."""


class WrittenByAnotherRun(RepositoryError):
    """Another run moved the same version into place while this one was writing it."""


class ModelRepository:
    """A folder laid out as Triton expects: `<root>/<model>/config.pbtxt` and `<root>/<model>/<N>/`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(version)

    def versions(self, name: str) -> list[int]:
        """Complete version folders of `name` (staging folders are not versions)."""
        folder = self.model_dir(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def metadata(self, name: str, version: int) -> dict[str, Any]:
        path = self.version_dir(name, version) / METADATA_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"{path} is missing or unreadable: {exc}; re-export version {version}") from exc

    @contextlib.contextmanager
    def stage_version(self, name: str, version: int, *, replace: bool = False) -> Iterator[Path]:
        """Yield an empty staging folder; on success it is renamed to `<name>/<version>` at once.

        Triton ignores non-numeric folders, so a half-written staging folder is never loaded, and
        a failure (KeyboardInterrupt, or SIGTERM in the CLI, included) removes it: a version folder
        either is complete or does not exist. The folder's name carries this process's pid, so a
        killed writer's leftover is removed by the next `remove_stale_staging`. With `replace`, the
        complete new folder is swapped with the existing version in one rename (the old one is
        deleted only after). If another run put the version in place first, WrittenByAnotherRun.
        """
        final = self.version_dir(name, version)
        if final.exists() and not replace:
            raise WrittenByAnotherRun(f"{final} already exists; versions are immutable (delete it to re-export)")
        staging = self._work_folder(name, "staging", version)
        try:
            staging.mkdir(parents=True)
        except OSError as exc:
            raise RepositoryError(f"cannot write to model repository {self.root}: {exc}") from exc
        try:
            yield staging
            _fsync_tree(staging)
            if replace:
                _exchange(staging, final)  # staging now holds the old version
            else:
                try:
                    os.rename(staging, final)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise RepositoryError(f"cannot move {staging} to {final}: {exc}") from exc
                    raise WrittenByAnotherRun(f"{final} was written by another run meanwhile") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("%s %s", "replaced" if replace else "wrote", final)

    def stale_work_folders(self, name: str) -> list[Path]:
        """The staging and trash folders of `name` whose writer process is no longer alive."""
        folder = self.model_dir(name)
        return sorted(p for p in (folder.iterdir() if folder.is_dir() else ())
                      if (m := _WORK_FOLDER.match(p.name)) and p.is_dir() and not _alive(int(m.group(2))))

    def remove_stale_staging(self, name: str) -> list[Path]:
        """Remove `stale_work_folders(name)`; returns them."""
        stale = self.stale_work_folders(name)
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by a writer that died", path)
        return stale

    def remove_version(self, name: str, version: int) -> None:
        """Delete a version folder, first renamed to a hidden name so no half version is left to load."""
        trash = self._work_folder(name, "trash", version)
        self.version_dir(name, version).rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _work_folder(self, name: str, kind: str, version: int) -> Path:
        return self.model_dir(name) / f".{kind}-{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def write_config(self, cfg: mc.ModelConfig) -> Path:
        """Write `<model>/config.pbtxt` atomically (temp file + rename)."""
        path = self.model_dir(cfg.name) / CONFIG_FILE
        _atomic_write(path, render(cfg))
        return path

    def restore_config(self, name: str, text: str) -> None:
        """Put back a config text saved earlier (after a failed rollout); empty text removes the config."""
        path = self.model_dir(name) / CONFIG_FILE
        if text:
            _atomic_write(path, text)
        else:
            path.unlink(missing_ok=True)

    def read_config(self, name: str) -> str | None:
        path = self.model_dir(name) / CONFIG_FILE
        return path.read_text() if path.exists() else None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temp file renamed into place."""
    _atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise RepositoryError(f"cannot write {path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _exchange(a: Path, b: Path) -> None:
    """Swap two existing folders in one atomic step (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise RepositoryError(f"cannot swap {a} with {b}: {os.strerror(err)}; nothing was replaced")


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
