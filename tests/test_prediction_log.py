"""The prediction log written inside Triton (backends/prediction_log.py) and read back (monitoring/prediction_log.py).

Real tritonserver for the feature-tensor model and for the raw-transaction model (real Redis); the ring, sampling,
retention and the reader's handling of torn segments are checked in-process on real files.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import time
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as grpcclient
from polars.testing import assert_frame_equal

from backends.prediction_log import PredictionLog, Settings, sampled
from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from monitoring import metric_names
from monitoring.prediction_log import FIXED_SCHEMA, IN_PROGRESS_S, read_window
from redis_fixtures import local_redis
from server.settings import TritonSettings
from test_online_serving import LENIENT, ONLINE_TARGETS, copy_model, export_online
from test_online_serving import MODEL as RAW_MODEL
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace
from triton_fixtures import serving, terminate, treeops_metrics

FEATURE_MODEL = "logged"
ALL_TIME = (dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2200, 1, 1, tzinfo=dt.UTC))
RAW_TYPES = {"transaction_id": "INT64", "card_id": "INT64", "timestamp": "INT64", "amount": "FP64",
             "merchant_category": "BYTES", "country": "BYTES", "channel": "BYTES"}


# --- in-process: ring, sampling, retention, reader ---------------------------------------------------------------

def _settings(root: Path, **env: str) -> Settings:
    return Settings({"TREEOPS_PREDICTION_LOG_DIR": str(root), **env})


def test_triton_settings_reach_the_backend_settings(tmp_path: Path):
    env = TritonSettings(prediction_log_dir=tmp_path, prediction_log_sample_rate=0.25, prediction_log_max_bytes=1234,
                         prediction_log_ring_size=7, prediction_log_flush_interval_s=0.5).prediction_log_environment()
    got = Settings(env)
    assert (got.root, got.sample_rate, got.max_bytes, got.ring_size, got.flush_interval_s) == (
        str(tmp_path.resolve()), 0.25, 1234, 7, 0.5)
    assert TritonSettings().prediction_log_environment() == {} and Settings({}).root is None  # off when unset
    with pytest.raises(ValueError, match="TREEOPS_PREDICTION_LOG_SAMPLE_RATE='2'.*prediction_log_"):
        Settings({**env, "TREEOPS_PREDICTION_LOG_SAMPLE_RATE": "2"})


def test_full_ring_drops_and_counts_without_blocking(tmp_path: Path):
    log = PredictionLog(_settings(tmp_path, TREEOPS_PREDICTION_LOG_RING_SIZE="5",
                                  TREEOPS_PREDICTION_LOG_FLUSH_INTERVAL_S="60"), "m", 1, ["a"])
    now = time.time_ns() // 1000
    kept = [log.append(f"r{i}", now, score=np.array([0.5]), features=np.ones((1, 1), np.float32)) for i in range(12)]
    assert kept == [True] * 5 + [False] * 7
    assert log.dropped == 7
    assert log.lag_s() >= 0.0
    log.close()
    frame = read_window(tmp_path, "m", *ALL_TIME)
    assert frame["request_id"].to_list() == [f"r{i}" for i in range(5)]
    assert log.lag_s() == 0.0


def test_sampling_is_a_function_of_the_request_id():
    ids = [f"req-{i}" for i in range(20_000)]
    first = [sampled(i, 0.25) for i in ids]
    assert first == [sampled(i, 0.25) for i in ids]  # a retry gets the same decision
    assert 0.23 < sum(first) / len(ids) < 0.27
    assert all(sampled(i, 1.0) for i in ids[:100]) and not any(sampled(i, 0.0) for i in ids[:100])


def test_retention_deletes_the_oldest_segments(tmp_path: Path):
    settings = _settings(tmp_path, TREEOPS_PREDICTION_LOG_FLUSH_INTERVAL_S="60")
    log = PredictionLog(settings, "m", 1, [f"f{j}" for j in range(20)])
    rng = np.random.default_rng(0)
    for i in range(6):
        log.append(f"r{i}", time.time_ns() // 1000, score=rng.random(50), features=rng.random((50, 20)))
        log.flush()
        if i == 0:  # room for two and a half segments of this size
            settings.max_bytes = int(next(tmp_path.rglob("*.parquet")).stat().st_size * 2.5)
    log.close()
    sizes = [p.stat().st_size for p in tmp_path.rglob("*.parquet")]
    assert 0 < sum(sizes) <= settings.max_bytes and len(sizes) == 2
    kept = read_window(tmp_path, "m", *ALL_TIME)["request_id"].unique(maintain_order=True).to_list()
    assert kept == ["r4", "r5"]  # the newest survive


def test_torn_and_foreign_segments_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    log = PredictionLog(_settings(tmp_path, TREEOPS_PREDICTION_LOG_FLUSH_INTERVAL_S="60"), "m", 1, ["a"])
    for i in range(3):
        log.append(f"r{i}", time.time_ns() // 1000, score=np.array([0.1]), features=np.ones((1, 1), np.float32))
        log.flush()
    log.close()
    torn, foreign = sorted(tmp_path.rglob("*.parquet"))[:2]
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    pq.write_table(pa.table({"request_id": ["x"], "other": [1]}), foreign)
    stopped, live = torn.parent / ".partial.parquet.tmp", torn.parent / ".live.parquet.tmp"
    stopped.write_bytes(b"PAR1")
    old = time.time() - IN_PROGRESS_S - 1
    os.utime(stopped, (old, old))  # its writer stopped before renaming it
    live.write_bytes(b"PAR1")  # a live writer's: skipped quietly
    with caplog.at_level(logging.WARNING, logger="monitoring.prediction_log"):
        frame = read_window(tmp_path, "m", *ALL_TIME)
    assert frame["request_id"].to_list() == ["r2"]
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert str(torn) in warnings and "torn" in warnings
    assert str(foreign) in warnings and "another schema" in warnings
    assert ".partial.parquet.tmp" in warnings and ".live.parquet.tmp" not in warnings


def test_empty_window_has_the_fixed_columns(tmp_path: Path):
    frame = read_window(tmp_path, "nothing", *ALL_TIME)
    assert frame.is_empty() and dict(frame.schema) == FIXED_SCHEMA
    with pytest.raises(ValueError, match="timezone-aware"):
        read_window(tmp_path, "m", dt.datetime(2020, 1, 1), dt.datetime(2021, 1, 1))


# --- through a real Triton ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def feature_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A small model exported as the Python-backend ONNX target (feature tensor in, logged server-side)."""
    ws = Workspace(tmp_path_factory.mktemp("logged"))
    before = mlflow.get_tracking_uri()
    data = write_transactions(generate_transactions(GenerateSpec(rows=3_000, seed=11)), ws.data_dir / "t.parquet")
    try:
        train_and_register(data, "is_fraud", FEATURE_MODEL, params=TrainParams(num_boost_round=10),
                           tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
        mlflow.set_tracking_uri(ws.tracking_uri)
        export_model(FEATURE_MODEL, ModelRepository(ws.model_repository),
                     settings=ExportSettings(target="python-onnx"))
    finally:
        mlflow.set_tracking_uri(before)
    return ws


def _log_env(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """tritonserver's environment carries TritonSettings' prediction-log variables (inherited by the launcher)."""
    for key, value in TritonSettings(prediction_log_dir=root).prediction_log_environment().items():
        monkeypatch.setenv(key, value)


def _features(client: grpcclient.InferenceServerClient, x: np.ndarray, request_id: str) -> np.ndarray:
    inp = grpcclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(FEATURE_MODEL, [inp], request_id=request_id).as_numpy("probabilities")


@pytest.mark.triton
def test_feature_model_logs_every_answered_request(feature_ws: Workspace, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    _log_env(monkeypatch, tmp_path / "log")
    n_features = int(ModelRepository(feature_ws.model_repository).metadata(FEATURE_MODEL, 1)["n_features"])
    rng = np.random.default_rng(1)
    sent = {}
    with serving(feature_ws, models=[FEATURE_MODEL], exit_timeout_s=5) as server:
        with grpcclient.InferenceServerClient(server.settings.grpc_url) as client:
            for i in range(40):
                x = rng.random((1 + i % 3, n_features), dtype=np.float32)
                x[0, i % n_features] = np.nan
                sent[f"req-{i}"] = (x, _features(client, x, f"req-{i}"))
        rows = sum(len(x) for x, _ in sent.values())
        histogram = metric_names.REQUEST_DURATION
        count = f'{histogram.name}_count{{model="{FEATURE_MODEL}",version="1"}}'
        deadline = time.monotonic() + 5  # published every 0.5 s, off the request path

        def counted(metrics: dict[str, float]) -> dict[str, float]:
            return {k: v for k, v in metrics.items() if k.startswith(metric_names.PREDICTIONS.name)}

        # a scrape can fall between a publish's histogram and its counters: wait for both
        while ((metrics := treeops_metrics(server)).get(count) != len(sent)
               or sum(counted(metrics).values()) != rows) and time.monotonic() < deadline:
            time.sleep(0.1)
        terminate(server)
    decisions = counted(metrics)
    assert sum(decisions.values()) == rows
    assert set(decisions) <= {f'{metric_names.PREDICTIONS.name}{{decision="{d}",model="{FEATURE_MODEL}",version="1"}}'
                              for d in ("positive", "negative")}
    assert metrics[count] == len(sent)  # warm-up requests are not counted
    prefix = f'{histogram.name}_bucket{{model="{FEATURE_MODEL}",version="1",le="'
    # Triton writes the bounds as %g ("1", not le_label's "1.0"; Prometheus 3 normalises both on scrape)
    assert {k[len(prefix):-2] for k in metrics if k.startswith(prefix)} == {f"{b:g}" for b in histogram.buckets} | {
        "+Inf"}
    frame = read_window(tmp_path / "log", FEATURE_MODEL, *ALL_TIME)
    assert frame.height == rows  # lossless on a graceful stop, warm-up requests not logged
    assert sorted(frame["request_id"].unique().to_list()) == sorted(sent)
    assert frame["error"].null_count() == rows and frame["transaction_id"].null_count() == rows
    features = [c for c in frame.columns if c.startswith("feature.")]
    assert len(features) == n_features
    for request_id, (x, scores) in sent.items():
        got = frame.filter(pl.col("request_id") == request_id)
        np.testing.assert_array_equal(got.select(features).to_numpy(), x)
        np.testing.assert_array_equal(got["score"].to_numpy(), scores[:, -1].astype(np.float64))
    assert (frame["model"] == FEATURE_MODEL).all() and (frame["version"] == 1).all()


@pytest.mark.triton
def test_kill_9_loses_at_most_the_unflushed_tail(feature_ws: Workspace, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    _log_env(monkeypatch, tmp_path / "log")
    n_features = int(ModelRepository(feature_ws.model_repository).metadata(FEATURE_MODEL, 1)["n_features"])
    x = np.zeros((1, n_features), np.float32)
    with serving(feature_ws, models=[FEATURE_MODEL], exit_timeout_s=5) as server:
        with grpcclient.InferenceServerClient(server.settings.grpc_url) as client:
            for i in range(20):
                _features(client, x, f"early-{i}")
            time.sleep(2.5)  # > flush interval (1 s) + one segment write
            for i in range(20):
                _features(client, x, f"late-{i}")
        os.killpg(server.pid, signal.SIGKILL)
        server._proc.wait(timeout=10)
    frame = read_window(tmp_path / "log", FEATURE_MODEL, *ALL_TIME)
    ids = set(frame["request_id"].to_list())
    assert {f"early-{i}" for i in range(20)} <= ids
    assert ids <= {f"early-{i}" for i in range(20)} | {f"late-{i}" for i in range(20)}


@pytest.mark.triton
@pytest.mark.parametrize("target", ONLINE_TARGETS)
def test_raw_model_logs_raw_fields_features_errors_and_degraded_answers(
        target: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture):
    """Both raw-transaction targets log the same records: raw fields, history features as offline, scores; a refused
    request with its error only; with the store down, a strict model's failure with its transaction id and a lenient
    model's degraded answer; the C backend's journal survives a torn tail. The last three transactions are one
    request (a record of several rows, text fields of varying length)."""
    _log_env(monkeypatch, tmp_path / "log")
    exported = export_online(Workspace(tmp_path_factory.mktemp("raw")), target)
    copy_model(exported, exported.ws.model_repository, LENIENT, "score_without_history")
    stream = (generate_transactions(GenerateSpec(rows=30, seed=9), first_id=70_000_000).drop("is_fraud")
              .sort("timestamp", "transaction_id"))
    rows = stream.with_columns(pl.col("timestamp").dt.epoch("us")).to_dicts()
    down = [{**rows[-1], "transaction_id": 2}, {**rows[-1], "transaction_id": 3}]
    answers = {}
    with local_redis(tmp_path_factory.mktemp("redis")) as store, serving(
            exported.ws, models=[RAW_MODEL, LENIENT], online_store_url=store.url, exit_timeout_s=5) as server:
        with grpcclient.InferenceServerClient(server.settings.grpc_url) as client:
            for row in rows[:-3]:
                answers[str(row["transaction_id"])] = client.infer(
                    RAW_MODEL, _raw_inputs(row), request_id=f"t-{row['transaction_id']}").as_numpy("probabilities")[0]
            last = client.infer(RAW_MODEL, _raw_inputs(*rows[-3:]), request_id="three").as_numpy("probabilities")
            answers.update({str(row["transaction_id"]): score for row, score in zip(rows[-3:], last)})
            bad = {**rows[0], "transaction_id": 1, "amount": -5.0}
            with pytest.raises(Exception, match="amount"):
                client.infer(RAW_MODEL, _raw_inputs(bad), request_id="bad-1")
            store.kill()
            with pytest.raises(Exception, match="UNAVAILABLE|unavailable"):
                client.infer(RAW_MODEL, _raw_inputs(down[0]), request_id="down-2")
            degraded = client.infer(LENIENT, _raw_inputs(down[1]), request_id="down-3")
            assert degraded.as_numpy("treeops_degraded").all()
        terminate(server)
    frame = read_window(tmp_path / "log", RAW_MODEL, *ALL_TIME)
    assert frame.height == len(rows) + 2
    failed = frame.filter(pl.col("error").is_not_null()).sort("request_id")
    assert failed["request_id"].to_list() == ["bad-1", "down-2"]
    assert "amount" in failed["error"][0] and "unavailable" in failed["error"][1]
    assert failed["transaction_id"].to_list() == [None, "2"]  # refused before it was read, or after
    assert failed["score"].is_null().all() and failed["raw.amount"].is_null().all() and not failed["degraded"].any()
    ok = frame.filter(pl.col("error").is_null())
    assert sorted(ok["transaction_id"].to_list()) == sorted(answers)
    assert not ok["degraded"].any()
    by_id = {r["transaction_id"]: r for r in ok.to_dicts()}
    for row in rows:
        got = by_id[str(row["transaction_id"])]
        assert got["entity"] == f"card_id={row['card_id']}"
        assert got["score"] == pytest.approx(float(answers[str(row["transaction_id"])][-1]), abs=0)
        for name in RAW_TYPES:
            assert got[f"raw.{name}"] == row[name]
    history = [c.removeprefix("feature.") for c in ok.columns if c.startswith("feature.")]
    assert sorted(history) == sorted(f.name for f in exported.features.spec.features if f.stateful)
    offline = (exported.features.spec.compute(stream.lazy()).collect().select(history)  # in the stream's row order
               .insert_column(0, stream["transaction_id"]).sort("transaction_id"))
    logged = ok.select(pl.col("transaction_id").cast(pl.Int64), *(pl.col(f"feature.{h}").alias(h) for h in history))
    assert_frame_equal(logged.sort("transaction_id"), offline.cast({h: pl.Float32 for h in history}))
    journals = sorted((tmp_path / "log" / f"model={RAW_MODEL}").rglob("*.tlog"))  # the C backend's, one per instance
    assert bool(journals) == (target == "native-compiled")
    for journal in journals[:1]:  # a torn tail (power loss) keeps the records before it, with a warning naming it
        journal.write_bytes(journal.read_bytes()[:-3])
        with caplog.at_level(logging.WARNING):
            torn = read_window(tmp_path / "log", RAW_MODEL, *ALL_TIME)
        assert f"{journal} is torn" in caplog.text
        lost = set(frame["request_id"]) - set(torn["request_id"])  # the last record's request, every row of it
        assert len(lost) == 1 and torn.height == frame.height - frame["request_id"].is_in(lost).sum()
    lenient = read_window(tmp_path / "log", LENIENT, *ALL_TIME)
    assert lenient["degraded"].to_list() == [True] and lenient["transaction_id"].to_list() == ["3"]
    assert lenient.select(f"feature.{h}" for h in history).null_count().sum_horizontal()[0] == 0  # NaN: no history
    assert np.isnan(lenient.select(f"feature.{h}" for h in history).to_numpy()).all()
    assert {c: t for c, t in frame.schema.items() if c.startswith("raw.")} == {
        f"raw.{n}": {"BYTES": pl.Utf8, "INT64": pl.Int64, "FP64": pl.Float64}[t] for n, t in RAW_TYPES.items()}


def _raw_inputs(*rows: dict) -> list[grpcclient.InferInput]:
    """One request holding `rows`."""
    inputs = []
    for name, datatype in RAW_TYPES.items():
        values = np.array([[row[name]] for row in rows], dtype=object if datatype == "BYTES" else
                          {"INT64": np.int64, "FP64": np.float64}[datatype])
        inp = grpcclient.InferInput(name, list(values.shape), datatype)
        inp.set_data_from_numpy(values)
        inputs.append(inp)
    return inputs
