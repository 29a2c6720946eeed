"""The native C backend's prediction log (journal segments) and its Triton custom metrics, on a real tritonserver.

The journal is read back by monitoring/prediction_log.py read_window into the same frame as the Python backends'
Parquet segments; torn and foreign segments are checked on journals a real server wrote.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import signal
import struct
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import tritonclient.grpc as grpcclient

from backends.prediction_log import sampled
from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from export.targets import get_target
from export.triton_config import ServingSettings
from monitoring import metric_names
from monitoring.prediction_log import FIXED_SCHEMA, JOURNAL_SUFFIX, read_window
from server.settings import TritonSettings
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace
from triton_fixtures import serving, terminate, treeops_metrics

MODEL = "native_logged"
#: The same version without Triton's batching (dims [-1, n_features]): an empty batch passes Triton's checks and is
#: refused by the backend itself, so a request fails inside the C backend.
UNBATCHED = "native_unbatched"
ALL_TIME = (dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2200, 1, 1, tzinfo=dt.UTC))
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the native-compiled target needs gcc")


@pytest.fixture(scope="module")
def native_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A small model exported as the default target (native-compiled: treeops' C backend), warm-up on; and the
    same version served without batching as UNBATCHED."""
    ws = Workspace(tmp_path_factory.mktemp("native-logged"))
    before = mlflow.get_tracking_uri()
    data = write_transactions(generate_transactions(GenerateSpec(rows=3_000, seed=12)), ws.data_dir / "t.parquet")
    try:
        train_and_register(data, "is_fraud", MODEL, params=TrainParams(num_boost_round=10),
                           tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
        mlflow.set_tracking_uri(ws.tracking_uri)
        repo = ModelRepository(ws.model_repository)
        export_model(MODEL, repo, settings=ExportSettings(target="native-compiled"))
    finally:
        mlflow.set_tracking_uri(before)
    shutil.copytree(repo.version_dir(MODEL, 1), repo.version_dir(UNBATCHED, 1))
    n = _n_features(ws)
    cfg = get_target("native-compiled").model_config(UNBATCHED, n, 2, ServingSettings(warmup=False), [1], {})
    cfg.max_batch_size = 0
    cfg.ClearField("dynamic_batching")
    cfg.input[0].dims[:] = [-1, n]
    cfg.output[0].dims[:] = [-1, 2]
    repo.write_config(cfg)
    return ws


def _n_features(ws: Workspace) -> int:
    return int(ModelRepository(ws.model_repository).metadata(MODEL, 1)["n_features"])


def _log_env(monkeypatch: pytest.MonkeyPatch, root: Path, **fields: object) -> None:
    """tritonserver's environment carries TritonSettings' prediction-log variables (inherited by the launcher)."""
    for key, value in TritonSettings(prediction_log_dir=root, **fields).prediction_log_environment().items():
        monkeypatch.setenv(key, value)


def _infer(client: grpcclient.InferenceServerClient, x: np.ndarray, request_id: str, model: str = MODEL
           ) -> np.ndarray:
    inp = grpcclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], request_id=request_id).as_numpy("probabilities")


@pytest.fixture(scope="module")
def served(native_ws: Workspace, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """40 answered requests (1-3 rows, NaN among them) to MODEL, one answered and one failed request to UNBATCHED,
    served by the C backend with the log on, the metrics read while it serves, then a graceful stop (SIGTERM)."""
    root = tmp_path_factory.mktemp("native-log")
    n_features = _n_features(native_ws)
    rng = np.random.default_rng(1)
    sent = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        _log_env(monkeypatch, root)
        with serving(native_ws, models=[MODEL, UNBATCHED], exit_timeout_s=5) as server:
            with grpcclient.InferenceServerClient(server.settings.grpc_url) as client:
                for i in range(40):
                    x = rng.random((1 + i % 3, n_features), dtype=np.float32)
                    x[0, i % n_features] = np.nan
                    sent[f"req-{i}"] = (x, _infer(client, x, f"req-{i}"))
                good = _infer(client, np.ones((2, n_features), np.float32), "good-1", UNBATCHED)
                with pytest.raises(Exception, match="rows >= 1") as failure:
                    _infer(client, np.zeros((0, n_features), np.float32), "bad-1", UNBATCHED)
            metrics = treeops_metrics(server)
            terminate(server)
    return {"root": root, "sent": sent, "metrics": metrics, "good": good, "failure": str(failure.value)}


@pytest.mark.triton
def test_native_model_logs_every_answered_request_with_its_score_and_features(served: dict,
                                                                              native_ws: Workspace):
    sent = served["sent"]
    rows = sum(len(x) for x, _ in sent.values())
    frame = read_window(served["root"], MODEL, *ALL_TIME)
    assert frame.height == rows  # nothing lost on a graceful stop; warm-up requests are not logged
    assert {k: frame.schema[k] for k in FIXED_SCHEMA} == FIXED_SCHEMA
    features = [c for c in frame.columns if c.startswith("feature.")]
    spec = ModelRepository(native_ws.model_repository).version_dir(MODEL, 1) / "feature_spec.json"
    assert features == [f"feature.{f['name']}" for f in json.loads(spec.read_text())["features"]]
    assert all(frame.schema[c] == pl.Float32 for c in features)
    assert frame["error"].null_count() == rows
    assert sorted(frame["request_id"].unique().to_list()) == sorted(sent)
    for request_id, (x, scores) in sent.items():
        got = frame.filter(pl.col("request_id") == request_id)
        np.testing.assert_array_equal(got.select(features).to_numpy(), x)  # NaN where it was sent
        np.testing.assert_array_equal(got["score"].to_numpy(), scores[:, -1].astype(np.float64))
    assert (frame["model"] == MODEL).all() and (frame["version"] == 1).all() and not frame["degraded"].any()
    assert frame["transaction_id"].null_count() == frame.height and frame["entity"].null_count() == frame.height


@pytest.mark.triton
def test_a_request_that_fails_in_the_backend_is_logged_with_its_error_not_its_features(served: dict):
    frame = read_window(served["root"], UNBATCHED, *ALL_TIME)
    features = [c for c in frame.columns if c.startswith("feature.")]
    assert frame["request_id"].to_list() == ["good-1", "good-1", "bad-1"]
    np.testing.assert_array_equal(frame["score"][:2].to_numpy(), served["good"][:, -1].astype(np.float64))
    failed = frame.filter(pl.col("error").is_not_null())
    assert failed["request_id"].to_list() == ["bad-1"] and "rows >= 1" in failed["error"][0]
    assert failed["error"][0] in served["failure"]  # the error the client got
    assert failed["score"].is_null().all() and failed.select(features).null_count().sum_horizontal()[0] == len(features)


@pytest.mark.triton
def test_native_model_publishes_the_declared_metrics_on_the_metrics_port(served: dict):
    metrics, sent = served["metrics"], served["sent"]
    rows = sum(len(x) for x, _ in sent.values())
    histogram = metric_names.REQUEST_DURATION
    labels = f'model="{MODEL}",version="1"'
    assert metrics[f"{histogram.name}_count{{{labels}}}"] == len(sent)  # answered only; warm-up not counted
    assert 0 < metrics[f"{histogram.name}_sum{{{labels}}}"] < len(sent) * 1.0
    prefix = f'{histogram.name}_bucket{{{labels},le="'
    # Triton writes the bounds as %g ("1", not le_label's "1.0"; Prometheus 3 normalises both on scrape)
    assert {k[len(prefix):-2] for k in metrics if k.startswith(prefix)} == {f"{b:g}" for b in histogram.buckets} | {
        "+Inf"}
    assert metrics[f'{prefix}+Inf"}}'] == len(sent)
    decisions = {k: v for k, v in metrics.items() if k.startswith(metric_names.PREDICTIONS.name) and labels in k}
    assert set(decisions) == {f'{metric_names.PREDICTIONS.name}{{decision="{d}",{labels}}}'
                              for d in ("positive", "negative")}
    assert sum(decisions.values()) == rows
    dropped = f'{metric_names.PREDICTION_LOG_DROPPED.name}{{model="{MODEL}"}}'
    assert metrics[dropped] == 0


@pytest.mark.triton
def test_sampling_keeps_the_same_requests_for_every_retry(native_ws: Workspace, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    _log_env(monkeypatch, tmp_path / "log", prediction_log_sample_rate=0.3)
    x = np.ones((1, _n_features(native_ws)), np.float32)
    ids = [f"sample-{i}" for i in range(120)]
    with serving(native_ws, models=[MODEL], exit_timeout_s=5) as server:
        with grpcclient.InferenceServerClient(server.settings.grpc_url) as client:
            for _ in range(2):  # each id twice: a retry
                for request_id in ids:
                    _infer(client, x, request_id)
        terminate(server)
    logged = read_window(tmp_path / "log", MODEL, *ALL_TIME)["request_id"].value_counts()
    assert dict(zip(logged["request_id"], logged["count"])) == {i: 2 for i in ids if sampled(i, 0.3)}
    assert 0 < logged.height < len(ids)


@pytest.mark.triton
def test_kill_9_loses_no_answered_request(native_ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each execute call writes its records before it sends a response: kill -9 right after the last answer."""
    _log_env(monkeypatch, tmp_path / "log")
    x = np.zeros((1, _n_features(native_ws)), np.float32)
    with serving(native_ws, models=[MODEL], exit_timeout_s=5) as server:
        with grpcclient.InferenceServerClient(server.settings.grpc_url) as client:
            for i in range(50):
                _infer(client, x, f"k-{i}")
        os.killpg(server.pid, signal.SIGKILL)
        server._proc.wait(timeout=10)
    frame = read_window(tmp_path / "log", MODEL, *ALL_TIME)
    assert sorted(frame["request_id"].to_list()) == sorted(f"k-{i}" for i in range(50))


@pytest.mark.triton
def test_retention_keeps_the_newest_segments_within_max_bytes(native_ws: Workspace, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    max_bytes = 40_000
    _log_env(monkeypatch, tmp_path / "log", prediction_log_max_bytes=max_bytes)
    x = np.zeros((20, _n_features(native_ws)), np.float32)  # about 3 kB a record
    with serving(native_ws, models=[MODEL], exit_timeout_s=5) as server:
        with grpcclient.InferenceServerClient(server.settings.grpc_url) as client:
            for i in range(100):
                _infer(client, x, f"r-{i:03d}")
        terminate(server)
    sizes = [p.stat().st_size for p in (tmp_path / "log").rglob(f"*{JOURNAL_SUFFIX}")]
    roll_bytes = max_bytes // 4  # a segment is closed past a quarter of max_bytes; retention runs then
    assert len(sizes) > 1 and sum(sizes) <= max_bytes + 2 * (roll_bytes + 3_000)  # + each instance's open one
    kept = read_window(tmp_path / "log", MODEL, *ALL_TIME)["request_id"].unique(maintain_order=True).to_list()
    assert "r-000" not in kept and len(kept) < 100
    assert {f"r-{i:03d}" for i in range(80, 100)} <= set(kept)  # the newest (20 records: about half of max_bytes)


def _journal(served: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the served log (root, and MODEL's segment that holds the last request, req-39) to damage."""
    root = tmp_path / "log"
    shutil.copytree(served["root"], root)
    (segment,) = [p for p in (root / f"model={MODEL}").rglob(f"*{JOURNAL_SUFFIX}") if b"req-39" in p.read_bytes()]
    return root, segment


@pytest.mark.triton
def test_a_torn_journal_tail_keeps_the_records_before_it_with_a_warning(served: dict, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture):
    root, segment = _journal(served, tmp_path)
    whole = read_window(root, MODEL, *ALL_TIME)
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # the last record cut short, as a killed partial write leaves it
    with caplog.at_level(logging.WARNING, logger="monitoring.prediction_log"):
        torn = read_window(root, MODEL, *ALL_TIME)
    assert torn.height == whole.height - 1 and "req-39" not in torn["request_id"].to_list()  # 1 row, sent last
    message = "\n".join(r.getMessage() for r in caplog.records)
    assert str(segment) in message and "torn at offset" in message
    offset = int(message.split("torn at offset ")[1].split(" ")[0])
    assert 0 < offset < len(data) - 7

    caplog.clear()
    flipped = bytearray(data)
    flipped[offset - 3] ^= 0xFF  # inside the record before the last: its CRC-32 fails, it and the rest are skipped
    segment.write_bytes(bytes(flipped))
    with caplog.at_level(logging.WARNING, logger="monitoring.prediction_log"):
        damaged = read_window(root, MODEL, *ALL_TIME)
    assert damaged.height < torn.height and "CRC-32" in caplog.text and str(segment) in caplog.text


@pytest.mark.triton
def test_a_journal_of_another_schema_or_version_is_skipped_with_a_warning(served: dict, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture):
    root, segment = _journal(served, tmp_path)
    data = segment.read_bytes()
    other_format = segment.with_name("00000000000000000001-1-other.tlog")
    other_format.write_bytes(data[:8] + struct.pack("<I", 99) + data[12:])
    moved = root / f"model={MODEL}" / "version=2" / segment.relative_to(root / f"model={MODEL}" / "version=1")
    moved.parent.mkdir(parents=True)
    shutil.copy(segment, moved)
    short = segment.with_name("00000000000000000002-1-short.tlog")
    short.write_bytes(data[:10])
    with caplog.at_level(logging.WARNING, logger="monitoring.prediction_log"):
        frame = read_window(root, MODEL, *ALL_TIME)
    assert frame.height == read_window(served["root"], MODEL, *ALL_TIME).height  # only the original is read
    assert f"skipping {other_format}, written with another schema (journal" in caplog.text
    assert f"skipping {moved}, written for model '{MODEL}' version 1, another model version" in caplog.text
    assert f"skipping {short}, 10 bytes, shorter than a header" in caplog.text


@pytest.mark.triton
def test_the_monitor_job_reads_native_served_traffic_unchanged(served: dict, native_ws: Workspace, tmp_path: Path):
    from monitoring.monitor import MonitorPaths, MonitorSettings, run_monitor

    paths = dataclasses.replace(MonitorPaths.in_workspace(tmp_path, MODEL, log_root=served["root"]),
                                model_repository=native_ws.model_repository)
    result = run_monitor(MODEL, *ALL_TIME, paths, settings=MonitorSettings(min_rows=50))  # 79 rows served
    (window,) = result.versions
    assert (window.version, window.rows, window.failed_rows) == (1, sum(len(x) for x, _ in served["sent"].values()), 0)
    assert window.drift is not None, window.skipped  # a drift verdict over the served features
