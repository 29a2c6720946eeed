"""`treeops serve` supervises tritonserver honestly: no orphan, no unnoticed stop, no NOT_FOUND on shutdown."""

from __future__ import annotations

import json
import logging
import os
import select
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server.errors import InsecureAdminError
from server.launcher import describe_exit, free_port
from server.server_record import ServerRecord
from server.settings import ADMIN_KEY_ENV
from training.features import FRAUD_FEATURES

from conftest import TREEOPS
from triton_fixtures import serving, triton_server

MODEL = "fraud"
pytestmark = pytest.mark.triton


@pytest.fixture
def workspace(trained, tmp_path) -> Path:
    """A workspace of its own (so its server record is not the session server's) serving the trained model."""
    root = tmp_path / "ws"
    shutil.copytree(trained.ws.model_repository, root / "model_repository")
    shutil.copy2(trained.ws.root / "mlflow.db", root / "mlflow.db")
    return root


def _serve(workspace: Path, *args: str, key: str | None = "k" * 32) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in {ADMIN_KEY_ENV, "MLFLOW_TRACKING_URI"}}
    if key is not None:
        env[ADMIN_KEY_ENV] = key
    ports = []
    for flag in ("--grpc-port", "--http-port", "--metrics-port"):
        if flag not in args:
            ports += [flag, str(free_port())]
    return subprocess.Popen([TREEOPS, "serve", *ports, *args, "--workspace", str(workspace)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready(serve: subprocess.Popen[str], workspace: Path, timeout_s: float = 90) -> ServerRecord:
    """Wait until the serve's Triton answers ready; its server record."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert serve.poll() is None, f"serve exited {serve.returncode}: {serve.communicate()[1][-2000:]}"
        record = ServerRecord.read(workspace / "reports" / "triton.pid.json")
        if record is not None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{record.ports['HTTP']}/v2/health/ready", timeout=1):
                    return record
            except OSError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"serve was not ready in {timeout_s}s")


def _supervising(serve: subprocess.Popen[str], timeout_s: float = 90) -> ServerRecord:
    """Wait for the ready line of a `serve --json`: its start is over and it supervises; the record of its Triton.

    Not `_ready`: Triton answering ready does not mean serve saw it yet. Under load a test that stopped or killed
    Triton at that point hit serve's start-up instead (a SIGSTOPped one then ran out serve's 120 s ready timeout).
    """
    readable, _, _ = select.select([serve.stdout], [], [], timeout_s)
    assert readable, f"serve printed no ready line in {timeout_s}s"
    line = serve.stdout.readline()
    assert line, f"serve exited {serve.wait()}: {serve.communicate()[1][-2000:]}"
    ready = json.loads(line)
    return ServerRecord(ready["pid"], serve.pid, {"gRPC": ready["grpc_port"], "HTTP": ready["http_port"],
                                                  "metrics": ready["metrics_port"]}, ready["model_repository"])


def _gone(pid: int, timeout_s: float = 10) -> bool:
    """Whether `pid` is gone (or a zombie) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`: a dead launcher's zombies wait for init to reap them."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[str]]]:
    """Serve processes a test started; killed (with any tritonserver they left) at the end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_killed_serve_takes_tritonserver_with_it_and_a_second_serve_names_the_first(workspace, reaper):
    first = _serve(workspace)
    reaper.append(first)
    record = _ready(first, workspace)

    second = _serve(workspace)
    reaper.append(second)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 1
    assert f"tritonserver pid {record.pid}" in err and "already serves this workspace" in err, err
    assert f"kill {first.pid}" in err, err

    first.send_signal(signal.SIGKILL)
    assert _gone(record.pid), "tritonserver outlived its killed serve"
    assert not _group(record.pid), "tritonserver's process group outlived its killed serve"

    ports = [a for flag, name in (("--grpc-port", "gRPC"), ("--http-port", "HTTP"), ("--metrics-port", "metrics"))
             for a in (flag, str(record.ports[name]))]
    third = _serve(workspace, *ports)
    reaper.append(third)
    assert _ready(third, workspace).ports == record.ports, "a restarted serve gets the same ports back"
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=30) == 0


def test_an_orphaned_tritonserver_of_the_workspace_is_stopped_at_start(trained, tmp_path, caplog):
    """A tritonserver whose launcher died without taking it along (an older treeops, a launcher killed mid-start)."""
    key = secrets.token_urlsafe(32)
    server = triton_server(trained.ws, tmp_path / "triton.log", admin_key=key)
    settings = server.settings
    orphan_launcher = (
        "import os, subprocess, sys, time; from server.server_record import ServerRecord\n"
        f"p = subprocess.Popen({server.command!r}, env={server.environment()!r}, start_new_session=True,"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        f"ServerRecord(p.pid, os.getpid(), {{'gRPC': {settings.grpc_port}}}, {server.served_repository!r}).write("
        f"__import__('pathlib').Path({str(server.record_path)!r}))\n"
        "print(p.pid, flush=True); time.sleep(600)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", orphan_launcher], stdout=subprocess.PIPE, text=True)
    orphan = int(launcher.stdout.readline())
    launcher.kill()
    launcher.wait()
    assert not _gone(orphan, timeout_s=1), "the simulated orphan should outlive its launcher"
    caplog.set_level(logging.WARNING)
    try:
        server.start(timeout_s=90, models=[MODEL])
        assert server.is_running()
    finally:
        server.stop()
        if not _gone(orphan, timeout_s=0):
            os.killpg(orphan, signal.SIGKILL)
    assert f"stopping tritonserver pid {orphan}" in caplog.text
    assert _gone(orphan, timeout_s=0)


def test_a_stopped_tritonserver_fails_liveness_and_serve_exits_non_zero(workspace, reaper):
    serve = _serve(workspace, "--json", "--liveness-interval-s", "0.5", "--liveness-failures", "2")
    reaper.append(serve)
    record = _supervising(serve)
    os.kill(record.pid, signal.SIGSTOP)
    try:
        _, err = serve.communicate(timeout=30)
    finally:
        if not _gone(record.pid, timeout_s=0):
            os.kill(record.pid, signal.SIGKILL)
    assert serve.returncode == 1
    assert f"tritonserver pid {record.pid} failed 2 liveness checks in a row" in err, err
    assert _gone(record.pid, timeout_s=5) and not _group(record.pid)


def test_a_tritonserver_killed_by_a_signal_is_an_error_naming_it(workspace, reaper):
    serve = _serve(workspace, "--json")
    reaper.append(serve)
    record = _supervising(serve)
    os.kill(record.pid, signal.SIGKILL)
    _, err = serve.communicate(timeout=30)
    assert serve.returncode == 1
    assert f"ERROR server.launcher: tritonserver pid {record.pid} was killed by SIGKILL" in err, err
    assert "exit code -9" not in err


def test_exit_descriptions():
    assert describe_exit(-signal.SIGSEGV) == "was killed by SIGSEGV"
    assert describe_exit(3) == "exited with code 3"


def test_stopping_a_python_backend_model_leaves_no_shared_memory(trained, tmp_path):
    """The launcher kills Triton mid-unload (below); what the unload would have removed, it removes."""
    import mlflow

    from export.pipeline import ExportSettings, export_model
    from export.repository import ModelRepository

    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    repository = ModelRepository(tmp_path / "model_repository")
    export_model(MODEL, repository, settings=ExportSettings(target="python-onnx"))
    with serving(trained.ws, tmp_path / "triton.log", repository=repository.root) as server:
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        regions = {Path(line.split()[-1]) for line in maps.splitlines() if "triton_python_backend_shm_region_" in line}
        assert regions and all(r.exists() for r in regions), "a Python-backend model maps its /dev/shm region"
    assert not [r for r in regions if r.exists()], "stop left the Python backend's shared memory in /dev/shm"


def test_shutdown_answers_unavailable_not_not_found(trained, tmp_path):
    """Measured on Triton 2.51 without the launcher's kill: ~1 s of NOT_FOUND "no available versions"."""
    with serving(trained.ws, tmp_path / "triton.log") as server:
        url = server.settings.grpc_url
        answers: list[tuple[float, str]] = []
        done = threading.Event()

        def loop() -> None:
            client = grpcclient.InferenceServerClient(url)
            width = len(FRAUD_FEATURES.names)
            request = grpcclient.InferInput("features", [1, width], "FP32")
            request.set_data_from_numpy(np.zeros((1, width), np.float32))
            while not done.is_set():
                started = time.monotonic()
                try:
                    client.infer(MODEL, [request], client_timeout=2)
                    status = "OK"
                except InferenceServerException as exc:
                    status = str(exc.status()).removeprefix("StatusCode.")
                answers.append((started, status))

        threads = [threading.Thread(target=loop) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1)
        stopping = time.monotonic()
        server.stop()
        stopped = time.monotonic()
        time.sleep(0.3)
        done.set()
        for t in threads:
            t.join()
    after = [(t - stopping, s) for t, s in answers if t >= stopping]
    statuses = {s for _, s in after}
    assert statuses <= {"OK", "UNAVAILABLE", "NOT_FOUND"}, statuses
    not_found = [t for t, s in after if s == "NOT_FOUND"]
    # Triton checks for in-flight requests once a second after SIGTERM, so unloading (and the launcher's kill at its
    # log line) starts 0 or about 1 s into the stop; what the kill bounds is how long NOT_FOUND lasts once it begins
    assert not not_found or max(not_found) - min(not_found) < 0.25, (
        f"NOT_FOUND for {max(not_found) - min(not_found):.3f}s of the shutdown (from {min(not_found):.3f}s)")
    assert stopped - stopping < 2, "the ports should close as soon as no inference is in flight"


def test_serve_refuses_open_admin_apis_unless_asked(workspace):
    serve = _serve(workspace, key=None)
    _, err = serve.communicate(timeout=60)
    assert serve.returncode == 2, "a keyless start is a settings error"
    assert "no admin key" in err and ADMIN_KEY_ENV in err and "--insecure-admin" in err, err


def test_launcher_refuses_a_keyless_start_and_warns_when_insecure(trained, tmp_path, caplog):
    server = triton_server(trained.ws, tmp_path / "triton.log")
    with pytest.raises(InsecureAdminError, match=f"unload models; set {ADMIN_KEY_ENV}.*--insecure-admin"):
        server.start()
    assert not server.is_running()
    caplog.set_level(logging.WARNING)
    with serving(trained.ws, tmp_path / "open.log", insecure_admin=True) as open_server:
        assert open_server.settings.admin_key is None
    assert "admin APIs are open without a key" in caplog.text
