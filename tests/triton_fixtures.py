"""The one way tests start a real tritonserver: free ports, an admin key, ready models, nothing left running.

`serving(ws, ...)` is the context manager every Triton test uses (the session `triton` fixture in
conftest.py too); `triton_server(ws, ...)` builds one that is not started, for tests of the start itself.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from server.installation import find_triton
from server.launcher import TritonServer, free_port
from server.settings import TritonSettings
from treeops.workspace import Workspace

MODEL = "fraud"
#: The test being set up or run (conftest.py sets it): a server started for a test without the `triton`
#: marker fails, so that `-m "not triton"` starts none.
current_test: pytest.Item | None = None


def triton_server(ws: Workspace, log_path: Path | None = None, *, repository: Path | None = None,
                  **fields: object) -> TritonServer:
    """A tritonserver (not started) on free ports serving `repository` (default: the workspace's).

    `fields` are TritonSettings fields (`exit_timeout_s` is 2 unless given); the log, and the server
    record beside it, default to `ws.reports_dir / "triton.log"`.
    """
    if current_test is not None and current_test.get_closest_marker("triton") is None:
        raise AssertionError(f"{current_test.nodeid} starts a tritonserver: mark it @pytest.mark.triton")
    fields.setdefault("exit_timeout_s", 2)
    settings = TritonSettings(model_repository=repository or ws.model_repository, grpc_port=free_port(),
                              http_port=free_port(), metrics_port=free_port(), **fields)
    return TritonServer(settings, find_triton(None, ws.triton_dir), log_path or ws.reports_dir / "triton.log")


@contextmanager
def serving(ws: Workspace, log_path: Path | None = None, *, repository: Path | None = None,
            models: Sequence[str] = (MODEL,), start_timeout_s: float = 90, **fields: object) -> Iterator[TritonServer]:
    """A started `triton_server(...)` with `models` ready; stopped on exit, failing if it left a process behind.

    Admin APIs need a key generated for this server (`server.settings.admin_key`) unless `fields` give
    `admin_key` or `insecure_admin=True`.
    """
    if not fields.get("insecure_admin"):
        fields.setdefault("admin_key", secrets.token_urlsafe(32))
    server = triton_server(ws, log_path, repository=repository, **fields)
    server.start(timeout_s=start_timeout_s, models=models)
    pid = server.pid
    try:
        yield server
    finally:
        server.stop()
        assert_no_leftover(pid)


def assert_no_leftover(pid: int | None) -> None:
    """Fail if any process of tritonserver `pid`'s process group (its Python-backend stubs) still runs."""
    if pid is None:
        return
    leftover = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.strip()
    assert not leftover, f"tritonserver pid {pid} left processes of its group behind: {leftover}"


def terminate(server: TritonServer) -> None:
    """A graceful stop as Kubernetes does it: SIGTERM to tritonserver, which unloads every model (finalize) and exits."""
    os.kill(server.pid, signal.SIGTERM)
    server._proc.wait(timeout=30)


def treeops_metrics(server: TritonServer) -> dict[str, float]:
    """The treeops_* samples on the server's metrics endpoint: `name{labels}` -> value."""
    text = urllib.request.urlopen(server.settings.metrics_url, timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("treeops_")}
