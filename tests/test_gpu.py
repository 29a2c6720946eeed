"""GPU checks: they run where `nvidia-smi -L` lists a GPU and are skipped with that reason elsewhere (conftest.py)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc

from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from export.triton_config import ServingSettings
from server.client import ScoringClient, load_features
from training.generate import GenerateSpec, generate_transactions
from triton_fixtures import MODEL, serving

pytestmark = [pytest.mark.gpu, pytest.mark.triton]


def test_gpu_instances_load_and_score_like_xgboost(trained, tmp_path):
    """`--instance-kind gpu` (what the GPU manifest's sync uses) on the real Triton: KIND_GPU Python-backend instances."""
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    try:
        repo = ModelRepository(tmp_path / "repo")
        settings = ExportSettings(target="python-onnx", serving=ServingSettings(instance_kind="gpu"))
        result = export_model(MODEL, repo, settings=settings)
        booster = mlflow.xgboost.load_model(f"models:/{MODEL}@champion")
    finally:
        mlflow.set_tracking_uri(before)
    x = load_features(result.version_dir).matrix_raw(generate_transactions(GenerateSpec(rows=500, seed=8)))
    with serving(trained.ws, tmp_path / "triton.log", repository=repo.root) as server:
        config = grpcclient.InferenceServerClient(server.settings.grpc_url).get_model_config(MODEL).config
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        with ScoringClient(server.settings.grpc_url, retries=0) as client:
            served = client.score(x).positive
    np.testing.assert_allclose(served, booster.inplace_predict(x), atol=1e-5)
