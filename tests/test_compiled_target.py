"""The python-compiled target: a tl2cgen forest behind the parity gate, served by the real Triton."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pytest

from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from server.client import ScoringClient, load_features
from server.installation import find_triton
from server.launcher import TritonServer, free_port
from server.settings import TritonSettings
from training.generate import GenerateSpec, generate_transactions

pytest.importorskip("tl2cgen", reason="the compiled runtime needs tl2cgen (pinned in the test extras)")
pytestmark = [pytest.mark.triton, pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler (gcc)")]


def test_compiled_version_passes_the_gate_and_serves_like_xgboost(trained, tmp_path):
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    try:
        repo = ModelRepository(tmp_path / "repo")
        result = export_model("fraud", repo, settings=ExportSettings(target="python-compiled"))
        booster = mlflow.xgboost.load_model("models:/fraud@champion")
    finally:
        mlflow.set_tracking_uri(before)
    assert result.parity is not None and result.parity.passed
    assert (result.version_dir / "forest.so").exists() and '"compiled"' in repo.read_config("fraud")
    features = load_features(result.version_dir)
    x = features.matrix_raw(generate_transactions(GenerateSpec(rows=2_000, seed=41)))
    settings = TritonSettings(model_repository=repo.root, grpc_port=free_port(), http_port=free_port(),
                              metrics_port=free_port(), exit_timeout_s=5)
    with TritonServer(settings, find_triton(None, tmp_path / "triton"), tmp_path / "triton.log") as server:
        server.wait_ready(90, ["fraud"])
        with ScoringClient(settings.grpc_url, retries=0, max_rows_per_request=256) as client:
            served = client.score(x).positive
    np.testing.assert_allclose(served, booster.inplace_predict(x), atol=1e-5)
