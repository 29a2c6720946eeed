"""The raw-transaction model served by a real Triton with its history in a real Redis.

Every score is checked against offline Polars features + xgboost over the same stream (the store
starts empty, so a transaction's history is the stream's earlier transactions of its card).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import xgboost as xgb

from backends.online_history import connect
from export.online import online_inputs
from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from online_store.redis_server import LocalRedis
from redis_fixtures import local_redis
from server.client import ScoringClient, load_features
from training.features import FittedFeatures
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace
from triton_fixtures import serving

pytestmark = [pytest.mark.triton]

MODEL = "online"
LENIENT = "online_lenient"  # the same version, on_store_unavailable = score_without_history


@dataclass(frozen=True)
class Exported:
    ws: Workspace
    features: FittedFeatures
    booster: xgb.Booster
    version_dir: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A model trained on history features, exported with --raw-inputs (parity gate passed), plus a lenient copy."""
    before = mlflow.get_tracking_uri()
    ws = Workspace(tmp_path_factory.mktemp("online"))
    data = write_transactions(generate_transactions(GenerateSpec(rows=8_000, seed=5)), ws.data_dir / "t.parquet")
    try:
        train_and_register(data, "is_fraud", MODEL, params=TrainParams(num_boost_round=30),
                           tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
        mlflow.set_tracking_uri(ws.tracking_uri)
        result = export_model(MODEL, ModelRepository(ws.model_repository), settings=ExportSettings(raw_inputs=True))
        booster = mlflow.xgboost.load_model(f"models:/{MODEL}/1")
    finally:
        mlflow.set_tracking_uri(before)
    assert result.parity is not None and result.parity.passed, result.parity
    lenient = ws.model_repository / LENIENT
    shutil.copytree(ws.model_repository / MODEL, lenient)
    config = (lenient / "config.pbtxt").read_text().replace(f'name: "{MODEL}"', f'name: "{LENIENT}"')
    policy = 'key: "on_store_unavailable"\n  value {\n    string_value: "error"'
    assert policy in config, config
    (lenient / "config.pbtxt").write_text(config.replace(policy, policy.replace('"error"', '"score_without_history"')))
    return Exported(ws, load_features(result.version_dir), booster, result.version_dir)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with local_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def triton(exported: Exported, store: LocalRedis):
    with serving(exported.ws, models=[MODEL, LENIENT], online_store_url=store.url, exit_timeout_s=5) as server:
        yield server


@pytest.fixture
def client(triton, store: LocalRedis) -> Iterator[ScoringClient]:
    connect(store.url).flushall()
    with ScoringClient(triton.settings.grpc_url, MODEL, retries=0) as c:
        yield c


def _stream(rows: int = 400, seed: int = 123) -> pl.DataFrame:
    """Unseen transactions in time order (about 40 per card, some with equal timestamps)."""
    raw = generate_transactions(GenerateSpec(rows=rows, seed=seed), first_id=50_000_000).drop("is_fraud")
    return raw.sort("timestamp", "transaction_id")


def _offline(exported: Exported, stream: pl.DataFrame) -> np.ndarray:
    """Polars features + xgboost, each row's history being the stream's earlier transactions of its card."""
    return exported.booster.inplace_predict(exported.features.matrix_raw(stream))


def _state(url: str) -> dict:
    """Every key of the store with its content."""
    client = connect(url)
    out = {}
    for key in client.scan_iter("*"):
        kind = client.type(key)
        out[key] = client.zrange(key, 0, -1, withscores=True) if kind == b"zset" else client.hgetall(key)
    return out


def test_inputs_are_the_raw_fields(exported: Exported, client: ScoringClient):
    signature = client.served_signature()
    assert {t.name: t.datatype for t in signature.inputs} == {
        "transaction_id": "INT64", "card_id": "INT64", "timestamp": "INT64", "amount": "FP64",
        "merchant_category": "BYTES", "country": "BYTES", "channel": "BYTES"}
    assert [r.name for r in online_inputs(exported.features)] == [t.name for t in signature.inputs]
    assert [t.name for t in signature.outputs] == ["probabilities", "treeops_degraded"]


def test_one_transaction_per_call_scores_like_offline_features_plus_xgboost(exported, client, store):
    stream = _stream()
    served = np.concatenate([client.score_transactions(stream.slice(i, 1)).positive for i in range(stream.height)])
    expected = _offline(exported, stream)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
    assert np.array_equal(served >= 0.5, expected >= 0.5)
    before = _state(store.url)
    last = stream.height - 3  # a retry (within the store's late-arrival day) of a transaction already scored
    again = client.score_transactions(stream.slice(last, 1)).positive
    assert again[0] == served[last]
    assert _state(store.url) == before
