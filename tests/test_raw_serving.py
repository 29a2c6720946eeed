"""A raw-input version served by the real Triton: score == Polars features + xgboost on every row.

The client turns rows of raw fields into the inputs the served signature names (one per raw field);
the fraud spec's history features come from a real Redis inside Triton, so rows are sent in time
order in requests of 256 transactions of many cards, and the store starts empty.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from redis_fixtures import local_redis
from server.client import ScoringClient, load_features
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace
from triton_fixtures import serving

pytestmark = [pytest.mark.triton]


def test_raw_input_version_scores_like_polars_features_plus_xgboost(tmp_path):
    before = mlflow.get_tracking_uri()
    ws = Workspace(tmp_path)
    data = write_transactions(generate_transactions(GenerateSpec(rows=15_000, seed=31)), ws.data_dir / "t.parquet")
    try:
        train_and_register(data, "is_fraud", "raw", params=TrainParams(num_boost_round=40),
                           tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
        mlflow.set_tracking_uri(ws.tracking_uri)
        repo = ModelRepository(ws.model_repository)
        result = export_model("raw", repo, settings=ExportSettings(raw_inputs=True))
        booster = mlflow.xgboost.load_model("models:/raw/1")
    finally:
        mlflow.set_tracking_uri(before)
    assert result.parity is not None and result.parity.passed
    features = load_features(result.version_dir)
    test_set = generate_transactions(GenerateSpec(rows=3_000, seed=77)).sort("timestamp")  # unseen, in time order
    with local_redis(tmp_path / "redis") as store, serving(ws, models=["raw"], exit_timeout_s=5,
                                                           online_store_url=store.url) as server:
        with ScoringClient(server.settings.grpc_url, "raw", retries=0, max_rows_per_request=256) as client:
            assert client.served_signature().feature_tensor is None
            served = client.score_raw(features, test_set).positive
    expected = booster.inplace_predict(features.matrix_raw(test_set))
    np.testing.assert_allclose(served, expected, atol=1e-6)
    assert np.array_equal(served >= 0.5, expected >= 0.5)
