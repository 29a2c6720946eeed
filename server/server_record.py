"""The record a launcher keeps of the tritonserver it started, so that a later launcher finds a stale one."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from server.errors import StaleServerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerRecord:
    """tritonserver `pid`, started by the launcher `launcher_pid`, listening on `ports` (name -> port),
    serving `repository` (a copied workspace carries the record of a server that is not its own)."""

    pid: int
    launcher_pid: int
    ports: dict[str, int]
    repository: str

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> ServerRecord | None:
        """The record at `path`, or None when there is none (or it is unreadable: a crash mid-write)."""
        try:
            data = json.loads(path.read_text())
            return cls(int(data["pid"]), int(data["launcher_pid"]), {k: int(v) for k, v in data["ports"].items()},
                       str(data["repository"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def describe(self) -> str:
        ports = ", ".join(f"{name} {port}" for name, port in self.ports.items())
        return f"tritonserver pid {self.pid} ({ports})"


def check_stale(path: Path, repository: str, stop_timeout_s: float = 10.0) -> None:
    """Act on the record at `path` before a new start of a server of `repository`.

    No record, its process is no tritonserver any more, or it serves another repository (the
    record came with a copied workspace): the record is removed and that process left alone. A tritonserver whose
    launcher still runs: StaleServerError naming both pids and how to stop them. A tritonserver whose
    launcher is gone (orphaned; its parent is no longer the launcher): it is stopped, with a warning.
    """
    record = ServerRecord.read(path)
    if record is None or record.repository != repository or not _is_tritonserver(record.pid):
        path.unlink(missing_ok=True)
        return
    if _parent_of(record.pid) == record.launcher_pid:
        raise StaleServerError(
            f"{record.describe()} already serves this workspace, started by launcher pid {record.launcher_pid} "
            f"(record {path}): stop it (`kill {record.launcher_pid}`, or Ctrl-C in its terminal) or use another "
            "--workspace"
        )
    log.warning("stopping %s left running by launcher pid %d, which is gone (record %s)",
                record.describe(), record.launcher_pid, path)
    _stop_group(record.pid, stop_timeout_s)
    path.unlink(missing_ok=True)


def _is_tritonserver(pid: int) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # gone, or not ours to inspect
        return False
    return Path(exe.removesuffix(" (deleted)")).name == "tritonserver" and state != "Z"


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _stop_group(pid: int, timeout_s: float) -> None:
    """SIGTERM the process group of `pid` (its own: the launcher starts it in a new session), then SIGKILL it."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _is_tritonserver(pid):
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while _is_tritonserver(pid) and time.monotonic() < deadline + 5:
        time.sleep(0.05)
