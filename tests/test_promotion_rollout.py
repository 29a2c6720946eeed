"""A promotion whose rollout a real Triton refuses (wrong admin key) leaves the registry exactly as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from registry.promotion import HISTORY_TAG
from server.client import ScoringClient, load_features
from training.generate import GenerateSpec, generate_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace
from triton_fixtures import serving

pytestmark = [pytest.mark.triton, pytest.mark.slow]
MODEL = "fraud"
ADMIN_KEY = "right-admin-key-0123456789"
TREEOPS = str(Path(sys.executable).parent / "treeops")


def _promote(ws: Workspace, url: str, key: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TREEOPS_TRITON_ADMIN_KEY": key}
    return subprocess.run([TREEOPS, "promote", "--force", "--triton-url", url, "--json", "--workspace", str(ws.root)],
                          capture_output=True, text=True, timeout=300, env=env)


def _registry_state() -> tuple[dict, str | None]:
    model = MlflowClient().get_registered_model(MODEL)
    return dict(model.aliases), model.tags.get(HISTORY_TAG)


def test_a_refused_rollout_leaves_the_aliases_as_before_and_can_be_retried(trained, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("refused"))
    shutil.copytree(trained.ws.root, ws.root, dirs_exist_ok=True)
    train_and_register(trained.data, "is_fraud", MODEL, params=TrainParams(num_boost_round=10),
                       tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)  # v2, challenger
    mlflow.set_tracking_uri(ws.tracking_uri)
    before = _registry_state()
    assert before[0] == {"champion": 1, "challenger": 2}
    config = (ws.model_repository / MODEL / "config.pbtxt").read_text()
    features = load_features(ws.model_repository / MODEL / "1")
    rows = features.matrix_raw(generate_transactions(GenerateSpec(rows=8, seed=5)))
    with serving(ws, models=[MODEL], admin_key=ADMIN_KEY) as server:
        url = server.settings.grpc_url
        refused = _promote(ws, url, "wrong-admin-key-0123456789")
        assert refused.returncode == 1, refused.stdout
        assert "the registry was put back as before this command (challenger 2, champion 1)" in refused.stderr
        assert _registry_state() == before  # @challenger kept: the promotion can be retried
        assert (ws.model_repository / MODEL / "config.pbtxt").read_text() == config
        assert not ws.audit_log.exists()
        with ScoringClient(url, MODEL, retries=0) as client:
            assert client.score(rows).model_version == "1"

        retried = _promote(ws, url, ADMIN_KEY)
        assert retried.returncode == 0, retried.stderr
        assert json.loads(retried.stdout)["sync"]["served"] == [2]
        assert _registry_state()[0] == {"champion": 2}
        with ScoringClient(url, MODEL, retries=0) as client:
            assert client.score(rows).model_version == "2"
