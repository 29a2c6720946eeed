"""Shared fixtures: a tiny trained-and-exported workspace and a real Triton serving it."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from export.pipeline import export_model
from export.repository import ModelRepository
from server.installation import find_triton
from server.launcher import TritonServer, free_port
from server.settings import TritonSettings
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import TrainOutcome, train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace

MODEL = "fraud"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass(frozen=True)
class TrainedWorkspace:
    ws: Workspace
    data: Path
    outcome: TrainOutcome
    repository: ModelRepository


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedWorkspace:
    """20k generated rows trained, registered as fraud@champion and exported (the default target)."""
    ws = Workspace(tmp_path_factory.mktemp("workspace"))
    data = write_transactions(generate_transactions(GenerateSpec(rows=20_000, seed=3)), ws.data_dir / "train.parquet")
    outcome = train_and_register(data, "is_fraud", MODEL, params=TrainParams(num_boost_round=60),
                                 tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
    repo = ModelRepository(ws.model_repository)
    export_model(MODEL, repo)
    return TrainedWorkspace(ws, data, outcome, repo)


@pytest.fixture(scope="session")
def triton(trained: TrainedWorkspace) -> Iterator[TritonServer]:
    """A real tritonserver on free ports serving the trained workspace's repository."""
    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    with serving(trained, trained.ws.reports_dir / "triton.log", exit_timeout_s=5) as server:
        yield server


@contextmanager
def serving(trained: TrainedWorkspace, log_path: Path, **fields: object) -> Iterator[TritonServer]:
    """A tritonserver of its own on free ports, serving the trained repository; checks cleanup.

    Admin APIs need a key generated for this server (`server.settings.admin_key`) unless `fields` say otherwise.
    """
    fields.setdefault("exit_timeout_s", 2)
    if not fields.get("insecure_admin"):
        fields.setdefault("admin_key", secrets.token_urlsafe(32))
    settings = TritonSettings(model_repository=trained.ws.model_repository, grpc_port=free_port(),
                              http_port=free_port(), metrics_port=free_port(), **fields)
    server = TritonServer(settings, find_triton(None, trained.ws.triton_dir), log_path)
    server.start(timeout_s=90, models=[MODEL])
    pid = server.pid
    try:
        yield server
    finally:
        server.stop()
        leftover = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.strip()
        assert not leftover, f"tritonserver left processes behind: {leftover}"

TREEOPS = str(Path(sys.executable).parent / "treeops")


def run_treeops(*args: str, workspace: Path, timeout: float = 300, mlflow_uri: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    """Run the installed `treeops` command in `workspace`: embedded MLflow unless `mlflow_uri` is given."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    return subprocess.run([TREEOPS, *args, "--workspace", str(workspace)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def treeops() -> Callable[..., subprocess.CompletedProcess[str]]:
    """The `treeops` CLI as a user runs it: `treeops("train", "--data", f, workspace=ws)`."""
    return run_treeops
