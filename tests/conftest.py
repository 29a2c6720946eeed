"""Shared fixtures: a tiny trained-and-exported workspace and a real Triton serving it."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

import triton_fixtures
from export.pipeline import export_model
from export.repository import ModelRepository
from server.launcher import TritonServer
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import TrainOutcome, train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace
from triton_fixtures import MODEL, serving

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@functools.cache
def _no_gpu_reason() -> str | None:
    """Why this machine cannot run a `gpu` test, or None where `nvidia-smi -L` lists a GPU."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return "needs an NVIDIA GPU: nvidia-smi is not on PATH"
    listed = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=60)
    if listed.returncode != 0 or "GPU " not in listed.stdout:
        return f"needs an NVIDIA GPU: `nvidia-smi -L` lists none ({(listed.stderr or listed.stdout).strip()[:200]})"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    triton_fixtures.current_test = item  # before its fixtures, module- and session-scoped ones too


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`gpu` tests are skipped, with the reason, where no GPU is listed (before any fixture trains or serves)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_tests and (reason := _no_gpu_reason()) is not None:
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason=reason))


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
    with serving(trained.ws, exit_timeout_s=5) as server:
        yield server


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
