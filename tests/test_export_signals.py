"""Real `treeops export` processes: SIGTERM cleans up like Ctrl-C, a killed export's staging folder is removed
by the next run, and the loser of two exports of the same version says another run wrote it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.repository import ModelRepository
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace

pytestmark = pytest.mark.slow
MODEL = "fraud"
TREEOPS = str(Path(sys.executable).parent / "treeops")


@pytest.fixture(scope="module")
def ws(trained, tmp_path_factory) -> Workspace:
    """A copy of the trained workspace with v2 registered (not exported)."""
    ws = Workspace(tmp_path_factory.mktemp("signals"))
    shutil.copytree(trained.ws.root, ws.root, dirs_exist_ok=True)
    train_and_register(trained.data, "is_fraud", MODEL, params=TrainParams(num_boost_round=10),
                       tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
    return ws


@pytest.fixture
def repo(ws) -> ModelRepository:
    repo = ModelRepository(ws.model_repository)
    if 2 in repo.versions(MODEL):
        repo.remove_version(MODEL, 2)
    return repo


def _export(ws: Workspace) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([TREEOPS, "export", "--version", "2", "--workspace", str(ws.root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _staging_of(proc: subprocess.Popen[str], repo: ModelRepository, timeout_s: float = 120) -> Path:
    """Wait until `proc` has created its staging folder of version 2 (its name carries the pid)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(repo.model_dir(MODEL).glob(f".staging-2-{proc.pid}-*"))
        if found:
            return found[0]
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"export never staged version 2: {proc.communicate()[1][-2000:]}")


def _hidden(repo: ModelRepository) -> list[str]:
    return sorted(p.name for p in repo.model_dir(MODEL).iterdir() if p.name.startswith("."))


def test_sigterm_during_export_removes_the_staging_folder(ws, repo):
    proc = _export(ws)
    _staging_of(proc, repo)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert _hidden(repo) == [] and 2 not in repo.versions(MODEL), err[-2000:]


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(ws, repo):
    proc = _export(ws)
    staging = _staging_of(proc, repo)
    proc.kill()
    proc.communicate(timeout=60)
    assert staging.exists()  # SIGKILL cannot be handled: the folder stays until a later run removes it
    again = _export(ws)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert out.startswith(f"wrote {repo.version_dir(MODEL, 2)}")
    assert not staging.exists() and _hidden(repo) == []


def test_the_loser_of_two_exports_reports_the_version_was_written_by_another_run(ws, repo):
    loser = _export(ws)
    _staging_of(loser, repo)
    os.kill(loser.pid, signal.SIGSTOP)  # holds its staging folder while the other run finishes
    try:
        winner = _export(ws)
        out, err = winner.communicate(timeout=300)
        assert winner.returncode == 0, err[-2000:]
        assert out.startswith("wrote ")
    finally:
        os.kill(loser.pid, signal.SIGCONT)
    out, err = loser.communicate(timeout=300)
    assert loser.returncode == 0, err[-2000:]
    assert out.startswith(f"kept (written by another run meanwhile) {repo.version_dir(MODEL, 2)}")
    assert "Traceback" not in err and "OSError" not in err
    assert _hidden(repo) == [] and repo.metadata(MODEL, 2)["target"] == "native-compiled"
