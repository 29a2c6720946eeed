"""A real redis-server for one workspace: `<workspace>/online_store/`, AOF persistence, 127.0.0.1 only.

Persistence: appendonly yes with appendfsync everysec, so `stop` (SHUTDOWN) loses nothing and a crash
(kill -9, power loss) loses at most about the last second of writes; `restart` reloads the AOF.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from backends.online_history import connect
from online_store.errors import RedisNotFoundError, RedisStartError

STORE_DIR = "online_store"
#: Written while a LocalRedis runs: {"pid", "port"}, so other commands find it instead of starting a second
#: server on the same files.
OWNER_FILE = "redis.json"
#: Held (flock, exclusive) by the redis-server of the directory for as long as it runs, loading included.
LOCK_FILE = "redis.lock"
#: redis-server flags of the store's persistence, here and in the Kubernetes StatefulSet (server/manifests.py):
#: the AOF alone (no RDB snapshots), fsynced every second.
PERSISTENCE_ARGS = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "")
_PR_SET_PDEATHSIG = 1


def running_url(workspace_dir: Path | str) -> str | None:
    """The URL of the redis-server a LocalRedis of this workspace runs now (it answers PING), else None."""
    try:
        owner = json.loads((Path(workspace_dir) / STORE_DIR / OWNER_FILE).read_text())
        cmdline = Path(f"/proc/{int(owner['pid'])}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if b"redis-server" not in cmdline:
        return None
    client = connect(f"redis://127.0.0.1:{int(owner['port'])}/0", timeout_s=1, retries=0)
    try:
        return f"redis://127.0.0.1:{int(owner['port'])}/0" if client.ping() else None
    except redis.RedisError:
        return None
    finally:
        client.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM (a clean shutdown, AOF flushed) when the starting process dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    """The redis-server on PATH."""
    found = shutil.which("redis-server")
    if found is None:
        raise RedisNotFoundError("redis-server is not on PATH: install it (`sudo apt-get install -y redis-server`) "
                                 "or set TREEOPS_ONLINE_STORE_URL to a running Redis")
    return found


class LocalRedis:
    """redis-server in `<workspace_dir>/online_store/` on `port` (default: a free one, kept across restarts).

    `start` returns once PING answers; `stop` shuts down cleanly (AOF flushed); `kill` is SIGKILL, as a
    crash; `restart` starts again on the same port and data. Usable as a context manager (stop at exit).
    The server gets SIGTERM (a clean shutdown) if the starting process dies, so none is left behind; while
    one runs (starting and loading its AOF included), a second LocalRedis of the same directory, in this
    process or another, refuses to start: two servers would corrupt one AOF. The guard is an exclusive
    flock on `<dir>/redis.lock` that the server process itself holds (the file descriptor is passed to it).
    """

    def __init__(self, workspace_dir: Path | str, port: int | None = None, start_timeout_s: float = 15.0):
        self.dir = Path(workspace_dir) / STORE_DIR
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def command(self) -> list[str]:
        """The redis-server command line."""
        return [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                *PERSISTENCE_ARGS, "--daemonize", "no", "--logfile", str(self.log_path), "--protected-mode", "yes"]

    def start(self) -> LocalRedis:
        """Start the server and wait until it answers PING (it has loaded its AOF by then)."""
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = self._lock()
        try:
            # Own session: Ctrl-C in a terminal reaches only treeops, which then stops the server cleanly.
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, start_new_session=True, pass_fds=(lock,),
                                            preexec_fn=_die_with_parent)
        finally:
            os.close(lock)  # the server holds the lock from here on, until it exits
        client = connect(self.url, timeout_s=1, retries=0)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                if self.process.poll() is not None:
                    said = self.process.stderr.read().decode(errors="replace").strip() if self.process.stderr else ""
                    self._close()
                    raise RedisStartError(f"redis-server for {self.dir} exited with {self.process.returncode}: "
                                          f"{said or self._log_tail()} (is port {self.port} taken?)")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        (self.dir / OWNER_FILE).write_text(json.dumps({"pid": self.process.pid, "port": self.port}))
                        return self
                if time.monotonic() > deadline:
                    self.kill()
                    raise RedisStartError(f"redis-server for {self.dir} did not answer PING on port {self.port} "
                                          f"within {self.start_timeout_s:.0f} s: {self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SHUTDOWN (the AOF is flushed), then wait for the process; SIGKILL if it does not exit."""
        if not self.running:
            return
        # No retries: the server closing the connection is SHUTDOWN's answer (redis-py's default retries with
        # backoff would reconnect to the exiting server for about 4 s).
        client = connect(self.url, timeout_s=timeout_s, retries=0)
        try:
            client.shutdown(nosave=False)
        except redis.RedisError:
            pass  # the server closed the connection while shutting down, or is already gone
        finally:
            client.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close()

    def kill(self) -> None:
        """SIGKILL, as a crash: writes of about the last second may be lost (appendfsync everysec)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self._close()

    def restart(self) -> LocalRedis:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop()
        return self.start()

    def _lock(self) -> int:
        """A descriptor holding the directory's lock; RedisStartError naming the server that holds it already."""
        path = self.dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = running_url(self.dir.parent)
            if other is not None:
                raise RedisStartError(f"a redis-server of this workspace already runs at {other} (data in {self.dir}), "
                                      f"started by another treeops command: use it (TREEOPS_ONLINE_STORE_URL={other}) "
                                      "or stop that command first") from None
            raise RedisStartError(f"another redis-server holds {path} (data in {self.dir}): it is still starting or "
                                  "loading its data; wait and use it, or stop the treeops command that started it"
                                  ) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _close(self) -> None:
        owner = self.dir / OWNER_FILE
        with contextlib.suppress(OSError, ValueError):
            if self.process is not None and json.loads(owner.read_text()).get("pid") == self.process.pid:
                owner.unlink()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return " | ".join(lines[-3:]) or "no log"

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def workspace_store(workspace_dir: Path | str, url: str | None = None) -> Iterator[str]:
    """The store a command of this workspace uses: `url` (TREEOPS_ONLINE_STORE_URL) when given; else the
    workspace's running LocalRedis (of `treeops serve`, say); else a LocalRedis started for the block and
    stopped after it (SHUTDOWN: its writes are on disk)."""
    if url is None:
        url = running_url(workspace_dir)
    if url is not None:
        yield url
        return
    with LocalRedis(workspace_dir) as local:
        yield local.url
