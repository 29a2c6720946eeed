"""The loop end to end on a real Triton serving raw transactions, their history in a real Redis (issue 13).

Champion v1 is trained on clean transactions, exported with raw inputs, and the online store is backfilled with its
training period. Drifted transactions of the same cards (later period, higher fraud rate) go through Triton, which
computes their history features from Redis and logs them, in two slices: the older one is the challenger's
training window, the newest its shadow and gate window. Every served transaction is labelled. Then `run_loop_once`
runs against the live Triton while raw transactions of other cards keep arriving from several clients.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest

from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from monitoring.labels import LABELLED_AT, ingest_labels
from monitoring.monitor import MonitorPaths
from monitoring.prediction_log import read_window
from online_store.backfill import backfill
from redis_fixtures import local_redis
from registry import versions as registry
from registry.promotion import AuditLog
from retraining.gate import GATE_SUFFIX, GateSettings
from retraining.loop import SHADOW_DIR, LoopSettings, run_loop_once
from retraining.shadow import shadow_path
from server.admin import AdminClient
from server.client import ScoringClient, load_features, transaction_feeds
from server.replay import replay, replay_parity
from steady_load import SteadyLoad
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.errors import EXIT_DRIFT, EXIT_QUALITY
from treeops.workspace import Workspace
from triton_fixtures import serving

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MODEL = "fraud"
ADMIN_KEY = "test-admin-key-0123456789"
PARAMS = TrainParams(num_boost_round=30, max_depth=4, learning_rate=0.2, subsample=0.9, seed=5)
TRAIN_ROWS, DRIFT_ROWS, GATE_ROWS = 4_000, 5_000, 1_500
CLIENTS = 4


@dataclass(frozen=True)
class ServedDrift:
    """Drifted transactions served through Triton in two slices, labelled, and the wall-clock times around them."""

    batch: pl.DataFrame  # with is_fraud, in timestamp order
    started: dt.datetime
    gate_from: dt.datetime  # the newest slice's first request came after this
    end: dt.datetime

    def settings(self, gate: GateSettings) -> LoopSettings:
        """Loop windows ending at `end`: [started, end) for the monitor, the newest slice for the gate."""
        return LoopSettings(window=self.end - self.started, gate_window=self.end - self.gate_from, gate=gate)


def serve_drift_in_two_slices(url: str, ws: Workspace, batch: pl.DataFrame, gate_rows: int) -> ServedDrift:
    """Send `batch` (raw transactions with `is_fraud`) through the served model, the newest `gate_rows` in a second
    slice, wait until Triton logged all of it, then ingest a label for every served transaction."""
    paths = MonitorPaths.in_workspace(ws.root, MODEL)
    raw = batch.drop("is_fraud")
    started = dt.datetime.now(dt.UTC)
    replay(url, MODEL, raw.head(raw.height - gate_rows), "card_id", clients=CLIENTS)
    gate_from = dt.datetime.now(dt.UTC)
    replay(url, MODEL, raw.tail(gate_rows), "card_id", clients=CLIENTS)
    end = dt.datetime.now(dt.UTC)
    deadline = time.monotonic() + 30  # the log flushes every flush interval, off the request path
    while (logged := read_window(paths.log_root, MODEL, started, end)).height < batch.height:
        assert time.monotonic() < deadline, f"Triton logged {logged.height} of {batch.height} served transactions"
        time.sleep(0.2)
    labels = batch.select(pl.col("transaction_id").cast(pl.String), label=pl.col("is_fraud").cast(pl.Int8),
                          **{LABELLED_AT: pl.lit(end.isoformat())})
    labels.write_csv(ws.root / "labels.csv")
    ingest_labels(ws.root / "labels.csv", paths.labels_dir, logged["transaction_id"].drop_nulls())
    return ServedDrift(batch, started, gate_from, end)


def _later(previous: pl.DataFrame, rows: int, seed: int, *, first_card: int = 0, drift: float = 0.0,
           fraud_rate: float = 0.015) -> pl.DataFrame:
    """`rows` transactions in the days after `previous`, ids after its own, in timestamp order."""
    spec = GenerateSpec(rows=rows, seed=seed, drift=drift, fraud_rate=fraud_rate,
                        start=previous["timestamp"].max() + dt.timedelta(days=1))
    batch = generate_transactions(spec, first_id=int(previous["transaction_id"].max()) + 1, first_card=first_card)
    return batch.sort("timestamp", "transaction_id")


@pytest.fixture
def tracking():
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def test_drifted_raw_traffic_is_retrained_shadowed_gated_and_promoted_live(tmp_path: Path, tracking):
    ws = Workspace(tmp_path / "ws")
    train = generate_transactions(GenerateSpec(rows=TRAIN_ROWS, seed=3)).sort("timestamp", "transaction_id")
    train_path = write_transactions(train, ws.data_dir / "train.parquet")
    train_and_register(train_path, "is_fraud", MODEL, params=PARAMS, tracking_uri=ws.tracking_uri,
                       artifact_root=ws.artifact_root)
    mlflow.set_tracking_uri(ws.tracking_uri)
    exported = export_model(MODEL, ModelRepository(ws.model_repository), settings=ExportSettings(raw_inputs=True))
    drifted = _later(train, DRIFT_ROWS, 11, drift=1.0, fraud_rate=0.06)  # the training period's cards, and more
    assert drifted["card_id"].is_in(train["card_id"].implode()).mean() > 0.5  # most have history in the store
    steady = _later(drifted, 400, 13, first_card=1_000_000)  # cards of their own: no shared history
    checks = _later(drifted, 200, 17).filter(pl.col("card_id").is_in(drifted["card_id"].implode())).head(5)
    gate = GateSettings(min_labels=50, slo_duration_s=3, slo_users=2, p99_ms=500.0)

    with (local_redis(tmp_path / "redis") as store,
          serving(ws, models=[MODEL], exit_timeout_s=5, admin_key=ADMIN_KEY, online_store_url=store.url,
                  prediction_log_dir=MonitorPaths.in_workspace(ws.root, MODEL).log_root,
                  prediction_log_flush_interval_s=0.2) as server,
          AdminClient(server.settings.grpc_url, ADMIN_KEY) as admin):
        backfill(store.url, load_features(exported.version_dir), train_path)
        url = server.settings.grpc_url
        served = serve_drift_in_two_slices(url, ws, drifted, GATE_ROWS)
        with ScoringClient(url, MODEL) as probe:
            signature = probe.served_signature()
        with SteadyLoad(url, transaction_feeds(signature, steady.drop("is_fraud")), threads=3, model=MODEL) as load:
            time.sleep(0.5)
            outcome = run_loop_once(MODEL, served.end, ws, served.settings(gate), triton=admin, grpc_url=url)
            deadline = time.monotonic() + 30
            while load.latest_version() != "2":
                assert time.monotonic() < deadline, "answers never came from version 2"
                time.sleep(0.05)
            time.sleep(0.3)
        with ScoringClient(url, MODEL) as client:
            answers = client.score_inputs(transaction_feeds(signature, checks.drop("is_fraud")))
        assert not admin.model_ready(MODEL + GATE_SUFFIX, 2)  # the gate's copy is gone

    # v1 served the drifted traffic on each card's backfilled history: its logged scores are offline xgboost's
    logged = read_window(MonitorPaths.in_workspace(ws.root, MODEL).log_root, MODEL, served.started, served.end)
    by_id = dict(zip(logged["transaction_id"].to_list(), logged["score"].to_list(), strict=True))
    v1_scores = np.array([by_id[str(i)] for i in drifted["transaction_id"].to_list()])
    v1 = replay_parity(mlflow.xgboost.load_model(f"models:/{MODEL}/1"), load_features(exported.version_dir), train,
                       drifted, v1_scores)
    assert v1.passed, v1
    # the monitor saw the drift (or the quality drop), the challenger trained on the older slice
    assert outcome.decision == "promoted", outcome.lines()
    monitor = next(e for e in AuditLog(ws.audit_log).read() if e["event"] == "loop_monitor")
    assert f"exit {EXIT_DRIFT}" in monitor["reason"] or f"exit {EXIT_QUALITY}" in monitor["reason"], monitor
    assert registry.aliases(MODEL) == {"champion": 2}
    lineage = mlflow.get_run(registry.resolve(MODEL, version=2).run_id).data.tags
    assert lineage["lineage.source"] == "prediction_log"
    assert lineage["lineage.rows"] == str(DRIFT_ROWS - GATE_ROWS) and lineage["lineage.rows_degraded"] == "0"
    # the shadow scored exactly the gate window's served rows
    gate_start = served.end - served.settings(gate).gate_window
    shadowed = pl.read_parquet(shadow_path(ws.root / SHADOW_DIR, MODEL, 2, gate_start, served.end))
    newest = set(drifted.tail(GATE_ROWS)["transaction_id"].cast(pl.String).to_list())
    assert shadowed.height == GATE_ROWS and set(shadowed["transaction_id"].to_list()) == newest
    assert [c.name for c in outcome.verdict.checks] == ["parity", "quality", "slo"]
    assert all(c.passed for c in outcome.verdict.checks), outcome.verdict.to_dict()
    # zero failed requests while the loop swapped versions under steady raw-transaction load
    assert load.failures == [], load.failures[:5]
    seen = [v for _, v in load.versions]
    assert seen[0] == "1" and seen[-1] == "2" and len(seen) > 100
    # version 2 answers, and matches offline features + xgboost of v2 on each card's history (backfill + drift)
    assert answers.model_version == "2"
    v2_dir = ModelRepository(ws.model_repository).version_dir(MODEL, 2)
    parity = replay_parity(mlflow.xgboost.load_model(f"models:/{MODEL}/2"), load_features(v2_dir),
                           pl.concat([train, drifted]), checks, answers.positive)
    assert parity.passed, parity
    events = [e["event"] for e in AuditLog(ws.audit_log).read()]
    assert events == ["loop_monitor", "loop_retrain", "loop_export", "loop_shadow", "gate_passed", "promote",
                      "loop_decision"]
