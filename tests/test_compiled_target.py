"""The compiled targets (tl2cgen forest in model.py, or in treeops' native C backend) on the real Triton."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import xgboost as xgb
from tritonclient.utils import InferenceServerException

from export.errors import UnsupportedModelError
from export.native_backend import BACKEND_LIBRARY
from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from export.targets import get_target
from export.triton_config import ServingSettings
from server.client import ScoringClient, load_features
from server.installation import find_triton
from server.launcher import TritonServer, free_port
from server.settings import TritonSettings
from training.generate import GenerateSpec, generate_transactions

pytest.importorskip("tl2cgen", reason="the compiled runtime needs tl2cgen (pinned in the test extras)")
pytestmark = [pytest.mark.triton, pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler (gcc)")]


def _export(trained, root, target: str):
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    try:
        repo = ModelRepository(root)
        result = export_model("fraud", repo, settings=ExportSettings(target=target))
        booster = mlflow.xgboost.load_model("models:/fraud@champion")
    finally:
        mlflow.set_tracking_uri(before)
    assert result.parity is not None and result.parity.passed
    return repo, result, booster


def _server(root, tmp_path, trained) -> TritonServer:
    settings = TritonSettings(model_repository=root, grpc_port=free_port(), http_port=free_port(),
                              metrics_port=free_port(), exit_timeout_s=5, strict_readiness=False)
    return TritonServer(settings, find_triton(None, trained.ws.triton_dir), tmp_path / "triton.log")


@pytest.mark.parametrize("target", ["python-compiled", "native-compiled"])
def test_compiled_version_passes_the_gate_and_serves_like_xgboost(target, trained, tmp_path):
    repo, result, booster = _export(trained, tmp_path / "repo", target)
    assert (result.version_dir / "forest.so").exists()
    if target == "native-compiled":
        assert (result.version_dir / BACKEND_LIBRARY).exists() and 'backend: "treeops_forest"' in repo.read_config("fraud")
    else:
        assert '"compiled"' in repo.read_config("fraud")
    features = load_features(result.version_dir)
    x = features.matrix_raw(generate_transactions(GenerateSpec(rows=2_000, seed=41)))
    with _server(repo.root, tmp_path, trained) as server:
        server.wait_ready(90, ["fraud"])
        with ScoringClient(server.settings.grpc_url, retries=0, max_rows_per_request=256) as client:
            served = client.score(x).positive
            single = client.score(x[:1]).positive
    np.testing.assert_allclose(served, booster.inplace_predict(x), atol=1e-5)
    assert single[0] == served[0]  # a row's score does not depend on its batch


def test_native_backend_rejects_bad_requests_and_keeps_serving(trained, tmp_path):
    """Wrong dtype, width or an empty batch get an error naming the input; good requests before and after are right."""
    repo, result, booster = _export(trained, tmp_path / "repo", "native-compiled")
    n = booster.num_features()
    x = np.random.default_rng(5).normal(size=(3, n)).astype(np.float32)
    with _server(repo.root, tmp_path, trained) as server:
        server.wait_ready(90, ["fraud"])
        client = grpcclient.InferenceServerClient(server.settings.grpc_url)

        def infer(array: np.ndarray, dtype: str = "FP32"):
            tensor = grpcclient.InferInput("features", list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            return client.infer("fraud", [tensor]).as_numpy("probabilities")

        good = infer(x)
        np.testing.assert_allclose(good[:, 1], booster.inplace_predict(x), atol=1e-5)
        for bad, dtype in ((x.astype(np.float64), "FP64"), (x[:, :-1].copy(), "FP32"), (np.zeros((0, n), np.float32), "FP32")):
            with pytest.raises(InferenceServerException, match="input 'features'"):
                infer(bad, dtype)
        np.testing.assert_array_equal(infer(x), good)
        assert client.is_server_live() and client.is_model_ready("fraud")
        stats = client.get_inference_statistics("fraud").model_stats[0]
        assert stats.inference_stats.success.count >= 2  # the backend reports its statistics


def test_native_version_without_its_forest_fails_to_load_with_the_reason(trained, tmp_path):
    repo, result, _ = _export(trained, tmp_path / "repo", "native-compiled")
    (result.version_dir / "forest.so").unlink()
    with _server(repo.root, tmp_path, trained) as server:
        client = grpcclient.InferenceServerClient(server.settings.grpc_url)
        (entry,) = [m for m in client.get_model_repository_index().models if m.name == "fraud"]
        assert entry.state == "UNAVAILABLE" and "forest.so" in entry.reason, entry
        assert client.is_server_live()


def test_native_target_refuses_gpu_instances_and_raw_inputs():
    target = get_target("native-compiled")
    with pytest.raises(UnsupportedModelError, match="CPU"):
        target.model_config("m", 4, 2, ServingSettings(instance_kind="gpu"), [1], {})
    with pytest.raises(UnsupportedModelError, match="feature tensor"):
        target.model_config("m", 4, 2, ServingSettings(), [1], {}, inputs=[])


def test_two_native_versions_loaded_together_each_score_their_own_forest(trained, tmp_path):
    """Each version's backend loads its own forest.so (same file name, other folder): no cross-talk."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    boosters = {version: xgb.train({"objective": "binary:logistic", "max_depth": 3, "seed": version},
                                   xgb.DMatrix(x, label=(x[:, version] > 0)), 10) for version in (1, 2)}
    repo, target = ModelRepository(tmp_path / "repo"), get_target("native-compiled")
    for version, booster in boosters.items():
        with repo.stage_version("twin", version) as staging:
            target.write_artifacts(booster, 5, staging)
    repo.write_config(target.model_config("twin", 5, 2, ServingSettings(max_batch_size=64), [1, 2], {}))
    with _server(repo.root, tmp_path, trained) as server:
        client = grpcclient.InferenceServerClient(server.settings.grpc_url)
        for version, booster in boosters.items():
            tensor = grpcclient.InferInput("features", [64, 5], "FP32")
            tensor.set_data_from_numpy(x[:64])
            served = client.infer("twin", [tensor], model_version=str(version)).as_numpy("probabilities")[:, 1]
            np.testing.assert_allclose(served, booster.inplace_predict(x[:64]), atol=1e-6)
    assert not np.allclose(boosters[1].inplace_predict(x), boosters[2].inplace_predict(x), atol=1e-3)
