"""Every client builds its requests from the served model's signature: each target this machine serves
(native-compiled, python-onnx, python-compiled, raw-input python-onnx) on one real Triton, scored by
ScoringClient / AsyncScoringClient, `treeops score` and `treeops loadtest`; and FIL's signature, read
from the fil target's config as a FIL Triton would publish it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import mlflow
import numpy as np
import polars as pl
import pytest
import xgboost as xgb
from tritonclient.grpc import service_pb2, service_pb2_grpc

from backends.online_history import connect
from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from export.signature import ServedSignature
from export.targets.fil import FilTarget
from export.triton_config import ServingSettings, parse
from redis_fixtures import local_redis
from server.client import AsyncScoringClient, ScoringClient, load_features
from server.launcher import TritonServer, free_port
from training.features import FittedFeatures
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.ingest import load_raw
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace
from triton_fixtures import serving

#: repository model name -> (export target, raw inputs); all four serve the same registered booster.
MODELS = {
    "native": ("native-compiled", False),
    "onnx": ("python-onnx", False),
    "compiled": ("python-compiled", False),
    "raw": ("python-onnx", True),
}


@dataclass(frozen=True)
class Served:
    ws: Workspace
    server: TritonServer
    booster: xgb.Booster
    features: FittedFeatures
    current: pl.DataFrame  # data/current.parquet, the CLI's default rows
    store_url: str  # the Redis of the raw model's history features


def _fresh_history(served: Served, name: str) -> None:
    """Empty the raw model's store: current.parquet spans 90 days, longer than the store keeps a transaction's
    first answer (longest window + 1 day), so scoring its rows again must start from the same empty state."""
    if MODELS[name][1]:
        connect(served.store_url).flushall()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One trained version registered under four names, exported to the four targets, on one Triton."""
    before = mlflow.get_tracking_uri()
    ws = Workspace(tmp_path_factory.mktemp("signature"))
    data = write_transactions(generate_transactions(GenerateSpec(rows=8_000, seed=41)), ws.data_dir / "train.parquet")
    current = write_transactions(generate_transactions(GenerateSpec(rows=300, seed=42)), ws.data_dir / "current.parquet")
    try:
        train_and_register(data, "is_fraud", "native", params=TrainParams(num_boost_round=25),
                           tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
        mlflow.set_tracking_uri(ws.tracking_uri)
        client = mlflow.MlflowClient()
        source = client.get_model_version("native", "1").source
        repo = ModelRepository(ws.model_repository)
        for name, (target, raw) in MODELS.items():
            if name != "native":
                mlflow.register_model(source, name)
                client.set_registered_model_alias(name, "champion", "1")
            export_model(name, repo, settings=ExportSettings(target=target, raw_inputs=raw))
        booster = mlflow.xgboost.load_model("models:/native/1")
    finally:
        mlflow.set_tracking_uri(before)
    features = load_features(repo.version_dir("native", 1))
    with local_redis(ws.root / "redis") as store, serving(ws, models=list(MODELS), start_timeout_s=120,
                                                          online_store_url=store.url) as server:
        yield Served(ws, server, booster, features, load_raw(current, features.spec.raw_schema).collect(), store.url)


def _config_signature(served: Served, name: str) -> ServedSignature:
    repo = ModelRepository(served.ws.model_repository)
    return ServedSignature.from_config(parse(repo.read_config(name) or ""))


@pytest.mark.triton
@pytest.mark.parametrize("name", MODELS)
def test_the_signature_read_from_triton_is_the_exported_one(served, name):
    with ScoringClient(served.server.settings.grpc_url, name) as client:
        signature = client.served_signature()
    assert signature == _config_signature(served, name)
    tensor = signature.feature_tensor
    if MODELS[name][1]:
        assert tensor is None
        kinds = {t.name: t.datatype for t in signature.inputs}
        assert kinds["amount"] == "FP64" and kinds["timestamp"] == "INT64" and "BYTES" in kinds.values()
    else:
        assert tensor is not None and tensor.dims == (len(served.features.spec.names),)


@pytest.mark.triton
@pytest.mark.parametrize("name", MODELS)
def test_clients_score_raw_rows_like_xgboost_on_every_target(served, name):
    raw = served.current
    expected = served.booster.inplace_predict(served.features.matrix_raw(raw))
    _fresh_history(served, name)
    with ScoringClient(served.server.settings.grpc_url, name, max_rows_per_request=128) as client:
        scores = client.score_raw(served.features, raw)

    async def score_async():
        async with AsyncScoringClient(served.server.settings.grpc_url, name, max_rows_per_request=128) as client:
            return await client.score_raw(served.features, raw.to_dicts())

    np.testing.assert_allclose(scores.positive, expected, atol=1e-5)
    _fresh_history(served, name)
    np.testing.assert_allclose(asyncio.run(score_async()).positive, scores.positive, atol=1e-6)
    assert scores.model_version == "1"


@pytest.mark.triton
def test_a_feature_matrix_for_a_raw_input_model_is_refused_naming_its_inputs(served):
    from server.errors import ScoringError

    with ScoringClient(served.server.settings.grpc_url, "raw", retries=0) as client:
        with pytest.raises(ScoringError, match=r"takes raw fields, not a feature matrix \(inputs .*amount FP64"):
            client.score(served.features.matrix_raw(served.current.head(2)))


@pytest.mark.triton
@pytest.mark.parametrize("name", MODELS)
def test_treeops_score_uses_the_served_signature(served, treeops, name):
    _fresh_history(served, name)
    proc = treeops("score", "--model-name", name, "--grpc-url", served.server.settings.grpc_url, "--rows", "7",
                       "--json", workspace=served.ws.root)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert ServedSignature.from_dict(out["signature"]) == _config_signature(served, name)
    expected = served.booster.inplace_predict(served.features.matrix_raw(served.current.head(7)))
    np.testing.assert_allclose(out["probability"], expected, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("name", MODELS)
def test_treeops_loadtest_drives_every_target_over_grpc_and_http(served, treeops, name):
    s = served.server.settings
    proc = treeops("loadtest", "--model-name", name, "--grpc-url", s.grpc_url, "--http-url", s.http_url,
                       "--protocol", "grpc", "--protocol", "http", "--users", "2", "--duration-s", "2", "--json",
                       workspace=served.ws.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["passed"] and out["requests"] > 0 and out["failures"] == 0 and out["errors"] == []


@pytest.mark.triton
def test_treeops_loadtest_that_cannot_read_the_signature_says_why(served, treeops):
    url = f"127.0.0.1:{free_port()}"
    proc = treeops("loadtest", "--model-name", "raw", "--grpc-url", url, "--duration-s", "1", workspace=served.ws.root)
    assert proc.returncode == 1
    assert f"cannot read model 'raw''s signature from Triton at {url} (grpc): StatusCode.UNAVAILABLE" in proc.stderr


@pytest.mark.triton
def test_without_a_data_file_a_raw_input_model_is_driven_with_its_versions_raw_holdout(served, tmp_path):
    from loadtest.pipeline import SAMPLE_ROWS, loadtest_served_model
    from loadtest.rows import load_rows

    s, before = served.server.settings, mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(served.ws.tracking_uri)
    try:
        result = loadtest_served_model(served.ws.model_repository, "raw", None, tmp_path, grpc_url=s.grpc_url,
                                       http_url=s.http_url, protocols=("grpc",), users=2, duration_s=1)
    finally:
        mlflow.set_tracking_uri(before)
    assert result.passed and result.aggregate.requests > 0, result.errors
    rows = load_rows(tmp_path / "rows.npz")
    assert sorted(rows) == sorted(t.name for t in _config_signature(served, "raw").inputs)
    assert 300 < len(rows["amount"]) <= SAMPLE_ROWS  # the holdout's rows, more than current.parquet's 300


class _FilLikeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers ModelMetadata from a model config as Triton does, and records every ModelInfer request."""

    def __init__(self, signature: ServedSignature, name: str) -> None:
        self.signature, self.name = signature, name
        self.requests: list[service_pb2.ModelInferRequest] = []

    def ModelMetadata(self, request, context):
        def tensors(ts):
            return [service_pb2.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                                     shape=[-1, *t.dims]) for t in ts]
        return service_pb2.ModelMetadataResponse(name=self.name, versions=["1"], platform="fil",
                                                 inputs=tensors(self.signature.inputs),
                                                 outputs=tensors(self.signature.outputs))

    def ModelInfer(self, request, context):
        self.requests.append(request)
        rows = request.inputs[0].shape[0]
        out = self.signature.output
        scores = np.tile(np.arange(out.dims[0], dtype=np.float32), (rows, 1))
        return service_pb2.ModelInferResponse(
            model_name=self.name, model_version="1",
            outputs=[service_pb2.ModelInferResponse.InferOutputTensor(name=out.name, datatype=out.datatype,
                                                                      shape=[rows, *out.dims])],
            raw_output_contents=[scores.tobytes()])


def test_scoring_client_sends_fil_models_input0_and_asks_for_output0():
    cfg = FilTarget().model_config("fraud_gpu", 8, 2, ServingSettings(), [1], {})
    signature = ServedSignature.from_config(cfg)
    fake = _FilLikeTriton(signature, "fraud_gpu")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        x = np.random.default_rng(0).normal(size=(5, 8))  # float64: the client casts to the signature's FP32
        with ScoringClient(f"127.0.0.1:{port}", "fraud_gpu", retries=0) as client:
            assert client.served_signature() == signature
            scores = client.score(x)
    finally:
        server.stop(None)
    [request] = fake.requests
    [inp] = request.inputs
    assert (inp.name, inp.datatype, list(inp.shape)) == ("input__0", "FP32", [5, 8])
    assert [o.name for o in request.outputs] == ["output__0"]
    np.testing.assert_array_equal(np.frombuffer(request.raw_input_contents[0], np.float32).reshape(5, 8),
                                  x.astype(np.float32))
    assert scores.probabilities.shape == (5, 2) and scores.model_version == "1"
