"""The shipped dvc.yaml + params.yaml under the real `dvc`: a full repro, a no-op rerun, and a train parameter
change that reruns train and export only (generate and validate stay as they were)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv: dvc, treeops and python as the stages call them

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "TREEOPS_WORKSPACE")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"  # no usage report sent from tests
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _ran(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in order (from its `Running stage 'NAME':` lines)."""
    return re.findall(r"Running stage '([^']+)'", output)


def _stale(repo: Path) -> set[str]:
    """The stages `dvc status` reports as changed."""
    return set(json.loads(_run([str(BIN / "dvc"), "status", "--json"], repo)))


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A fresh git + DVC repository with the shipped pipeline and its parameters, scaled down to run quickly."""
    _run(["git", "init", "-q"], tmp_path)
    _run([str(BIN / "dvc"), "init", "-q"], tmp_path)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["generate"]["rows"] = 5_000
    params["train"]["max_rounds"] = 20
    params["export"]["target"] = "python-onnx"  # no C compile: the pipeline, not the target, is under test
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_repro_runs_every_stage_then_only_what_a_train_parameter_changes(dvc_repo: Path) -> None:
    dvc = str(BIN / "dvc")
    first = _run([dvc, "repro"], dvc_repo)
    assert _ran(first) == ["generate", "validate", "train", "export"]
    exported = json.loads((dvc_repo / "reports/dvc/export.json").read_text())
    assert (dvc_repo / "model_repository/fraud/1").is_dir(), exported
    assert _stale(dvc_repo) == set()

    again = _run([dvc, "repro"], dvc_repo)
    assert _ran(again) == [], again
    assert "Data and pipelines are up to date" in again

    data_before = (dvc_repo / "data/train.parquet").stat().st_mtime_ns
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    params["train"]["max_rounds"] = 15
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert _stale(dvc_repo) == {"train"}  # export is stale only through train's output, once train has run

    changed = _run([dvc, "repro"], dvc_repo)
    assert _ran(changed) == ["train", "export"], changed
    assert (dvc_repo / "data/train.parquet").stat().st_mtime_ns == data_before
    trained = json.loads((dvc_repo / "reports/dvc/train.json").read_text())
    assert trained["version"] == 2 and trained["metrics"]["best_iteration"] <= 14
    assert (dvc_repo / "model_repository/fraud/2").is_dir()  # export took the version train registered
    assert _stale(dvc_repo) == set()
