"""The replay test of issue 11: a backfilled store, then a held-out period streamed through a real Triton.

The training period is backfilled into a real Redis; the following period (6,000 transactions, with
the generator's bursts, forced equal timestamps and late arrivals) is sent one transaction per
request from 8 concurrent clients, each card through one client in stream order, cards interleaved.
A swapped pair's late transaction can arrive days behind its card's newest one, beyond the store's
late allowance (FeatureSpec.late_arrival, 1 d for the fraud spec): it then sees only the part of its
window the store keeps. Every served score must equal offline features + xgboost on the history as defined in training/history.py, allowance
included (max |diff| <= 1e-5, no flipped decision).
"""

from __future__ import annotations

import mlflow
import numpy as np
import polars as pl
import pytest

from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from online_store.backfill import backfill
from redis_fixtures import local_redis
from server.client import load_features
from server.replay import partitions, replay, replay_parity
from test_online_serving import TARGET_PARAMS
from training.features import FRAUD_FEATURES
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace
from triton_fixtures import serving

pytestmark = [pytest.mark.triton]

MODEL = "replay"
STREAM_ROWS = 6_000


def _periods(seed: int = 41) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Training period and the held-out stream after it (same cards), the stream in arrival order."""
    data = generate_transactions(GenerateSpec(rows=30_000, seed=seed)).sort("timestamp", "transaction_id")
    cut = data["timestamp"][data.height - STREAM_ROWS]
    train, stream = data.filter(pl.col("timestamp") < cut), data.filter(pl.col("timestamp") >= cut)
    rng = np.random.default_rng(seed)
    # Equal timestamps: some transactions take the time of their card's previous one.
    prev = stream.select(pl.col("timestamp").shift(1).over("card_id", order_by=["timestamp", "transaction_id"]))
    tie = (rng.random(stream.height) < 0.05) & prev.to_series().is_not_null().to_numpy()
    stream = stream.with_columns(pl.when(pl.Series(tie)).then(prev.to_series()).otherwise("timestamp").alias("timestamp"))
    # Late arrivals: for some cards, two consecutive transactions arrive in the other order.
    order = np.arange(stream.height)
    by_card = stream.with_row_index("row").group_by("card_id", maintain_order=True).agg("row")
    for rows in by_card["row"].to_list():
        if len(rows) >= 2 and rng.random() < 0.2:
            k = int(rng.integers(0, len(rows) - 1))
            a, b = rows[k], rows[k + 1]
            order[a], order[b] = order[b], order[a]
    return train, stream[order]


def test_stream_has_ties_late_arrivals_and_interleaved_clients():
    _, stream = _periods()
    assert stream.height >= 5_000
    late = stream.select((pl.col("timestamp").diff().over("card_id") < 0).sum()).item()
    ties = stream.select((pl.col("timestamp").diff().over("card_id") == 0).sum()).item()
    assert late >= 50 and ties >= 50, (late, ties)
    # how far behind its card's newest earlier-arrived transaction each one arrives: within and beyond the spec's
    # late allowance
    behind = stream.select((pl.col("timestamp").cum_max().shift(1).over("card_id") - pl.col("timestamp"))
                           .dt.total_microseconds()).to_series()
    beyond = int((behind > FRAUD_FEATURES.late_arrival_us).sum())
    assert beyond >= 20 and late - beyond >= 20, (late, beyond)
    parts = partitions(stream, "card_id", 8)
    assert sorted(np.concatenate(parts).tolist()) == list(range(stream.height))
    for rows in parts:  # each card through one client, in stream order
        assert np.all(np.diff(rows) > 0)
        assert set(stream[rows]["card_id"].to_list()).isdisjoint(
            set(stream[np.setdiff1d(np.arange(stream.height), rows)]["card_id"].to_list()))


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_replay_scores_every_transaction_like_offline_features_plus_xgboost(tmp_path, target):
    ws = Workspace(tmp_path / "ws")
    train, stream = _periods()
    data = write_transactions(train, ws.data_dir / "train.parquet")
    before = mlflow.get_tracking_uri()
    try:
        train_and_register(data, "is_fraud", MODEL, params=TrainParams(num_boost_round=60),
                           tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
        mlflow.set_tracking_uri(ws.tracking_uri)
        exported = export_model(MODEL, ModelRepository(ws.model_repository), settings=ExportSettings(raw_inputs=True,
                                                                                                           target=target))
        booster = mlflow.xgboost.load_model(f"models:/{MODEL}/1")
    finally:
        mlflow.set_tracking_uri(before)
    features = load_features(exported.version_dir)
    with local_redis(tmp_path / "redis") as store:
        loaded = backfill(store.url, features, data)
        assert loaded.rows == train.height
        with serving(ws, models=[MODEL], online_store_url=store.url, exit_timeout_s=5) as server:
            result = replay(server.settings.grpc_url, MODEL, stream.drop("is_fraud"), "card_id", clients=8)
    parity = replay_parity(booster, features, train, stream, result.probabilities)
    assert parity.rows == STREAM_ROWS
    assert parity.passed, parity
    assert parity.max_abs_diff <= 1e-5 and parity.flipped_decisions == 0
