"""treeops retrain: a challenger from logged traffic joined with labels (or a file), with the champion's parameters,
registered as @challenger with lineage; too few labels or a single class register nothing (exit 6)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from mlflow.tracking import MlflowClient

from backends.prediction_log import DIR_ENV, MAX_BYTES_ENV, RING_SIZE_ENV, PredictionLog, Settings
from bench.monitor import log_predictions
from export.errors import ExportError
from export.parity import reference_scores
from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from monitoring.labels import LABELLED_AT, ingest_labels
from monitoring.monitor import MonitorPaths
from monitoring.prediction_log import read_window
from monitoring.reference import feature_column
from registry import versions as registry
from retraining.errors import InsufficientLabelsError
from retraining.retrain import RetrainSettings, champion, retrain_from_log
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.errors import EXIT_NO_DATA
from treeops.workspace import Workspace

MODEL = "fraud"
END = dt.datetime(2026, 3, 1, 13, tzinfo=dt.UTC)
START = END - dt.timedelta(hours=1)
UNLABELLED_END = END + dt.timedelta(days=1)  # a window whose traffic has no label
TREEOPS = str(Path(sys.executable).parent / "treeops")
PARAMS = TrainParams(num_boost_round=30, max_depth=4, learning_rate=0.2, subsample=0.9, seed=5)

pytestmark = pytest.mark.slow


@dataclasses.dataclass(frozen=True)
class Served:
    ws: Workspace
    paths: MonitorPaths
    data: Path  # the champion's training file
    matrix: np.ndarray  # the logged features of the labelled window, in arrival order
    labels: pl.DataFrame


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """A champion (version 1) trained on 8k rows; 3k transactions it served logged in the hour before END, all
    labelled; 500 more logged a day later without labels."""
    ws = Workspace(tmp_path_factory.mktemp("retrain"))
    data = write_transactions(generate_transactions(GenerateSpec(rows=8_000, seed=3)), ws.data_dir / "train.parquet")
    train_and_register(data, "is_fraud", MODEL, params=PARAMS, tracking_uri=ws.tracking_uri,
                       artifact_root=ws.artifact_root)
    bundle = registry.load_bundle(registry.resolve(MODEL, alias="champion"), tmp_path_factory.mktemp("bundle"))
    paths = MonitorPaths.in_workspace(ws.root, MODEL)
    raw = generate_transactions(GenerateSpec(rows=3_000, seed=11, fraud_rate=0.05), first_id=1_000_000)
    x = bundle.fitted.matrix_raw(raw)
    ids = raw["transaction_id"].cast(pl.String).to_list()
    log_predictions(paths.log_root, bundle.fitted.spec.names, x, reference_scores(bundle.booster, x)[:, -1], ids,
                    end=END)
    later = generate_transactions(GenerateSpec(rows=500, seed=12), first_id=2_000_000)
    xl = bundle.fitted.matrix_raw(later)
    log_predictions(paths.log_root, bundle.fitted.spec.names, xl, reference_scores(bundle.booster, xl)[:, -1],
                    later["transaction_id"].cast(pl.String).to_list(), end=UNLABELLED_END)
    labels = pl.DataFrame({"transaction_id": ids, "label": raw["is_fraud"].cast(pl.Int8),
                           LABELLED_AT: [END.isoformat()] * len(ids)})
    labels_file = ws.root / "labels.csv"
    labels.write_csv(labels_file)
    ingest_labels(labels_file, paths.labels_dir, pl.Series(ids))
    return Served(ws, paths, data, x, labels)


def _versions() -> list[int]:
    return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name='{MODEL}'"))


def _treeops(*args: str, ws: Workspace) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "TREEOPS_WORKSPACE")}
    return subprocess.run([TREEOPS, *args, "--workspace", str(ws.root), "--json"], capture_output=True, text=True,
                          timeout=300, env=env)


def test_retrain_from_the_log_registers_a_challenger_with_the_champions_parameters_and_lineage(served, tmp_path):
    before = _versions()
    outcome = retrain_from_log(MODEL, START, END, served.paths, tracking_uri=served.ws.tracking_uri,
                               artifact_root=served.ws.artifact_root, trigger="monitor fraud/v1/20260301T1200")
    assert outcome.registered.version == max(before) + 1 and outcome.registered.alias == "challenger"
    assert registry.aliases(MODEL) == {"champion": 1, "challenger": outcome.registered.version}

    client = MlflowClient()
    tags = client.get_model_version(MODEL, str(outcome.registered.version)).tags
    assert tags["lineage.source"] == "prediction_log" and tags["lineage.trigger"] == "monitor fraud/v1/20260301T1200"
    assert (tags["lineage.window_start"], tags["lineage.window_end"]) == (START.isoformat(), END.isoformat())
    assert tags["lineage.rows"] == tags["lineage.labels"] == str(served.labels.height)
    assert tags["lineage.positives"] == str(int(served.labels["label"].sum()))
    assert tags["lineage.champion_version"] == "1" and tags["lineage.versions"] == "1"
    assert client.get_run(outcome.registered.run_id).data.tags["lineage.window_end"] == END.isoformat()

    # trained with the champion's parameters, read back from its run
    base = champion(MODEL)
    assert dataclasses.replace(base.params, objective="auto") == dataclasses.replace(PARAMS, objective="auto")
    champion_params = client.get_run(base.run_id).data.params
    new_params = client.get_run(outcome.registered.run_id).data.params
    for key in ("max_depth", "eta", "subsample", "colsample_bytree", "min_child_weight", "seed", "num_boost_round"):
        assert new_params[key] == champion_params[key], key

    # the challenger keeps the champion's fitted features, and its holdout is the newest logged rows exactly as served
    bundle = registry.load_bundle(registry.resolve(MODEL, version=outcome.registered.version), tmp_path)
    assert bundle.fitted.spec_hash() == base.fitted.spec_hash()
    held = bundle.holdout.height
    assert held == int(served.labels.height * PARAMS.test_fraction)
    np.testing.assert_array_equal(bundle.fitted.matrix(bundle.holdout), served.matrix[-held:])
    assert bundle.holdout["is_fraud"].to_list() == served.labels["label"].tail(held).to_list()
    assert outcome.metrics["roc_auc"] > 0.7

    # trained on ready features, it has no raw rows to prove a raw graph on: one clear error, nothing written
    assert bundle.raw_holdout.height == 0
    repository = ModelRepository(tmp_path / "repo")
    with pytest.raises(ExportError, match="no raw held-out rows"):
        export_model(MODEL, repository, version=outcome.registered.version, settings=ExportSettings(raw_inputs=True))
    assert repository.versions(MODEL) == []


def test_served_features_are_used_not_recomputed(served, tmp_path):
    """A logged history feature that offline recomputation would not give (here: one more transaction in the last
    hour than the card had) is what the challenger learns from: the log, not the raw rows, is the features' source."""
    logged = read_window(served.paths.log_root, MODEL, START, END)
    names = champion(MODEL).fitted.spec.names
    x = logged.select(feature_column(n) for n in names).to_numpy().astype(np.float32)
    column = names.index("card_txn_count_1h")
    x[:, column] += 1.0
    shifted = tmp_path / "log"
    log_predictions(shifted, names, x, logged["score"].to_numpy(), logged["transaction_id"].to_list(), end=END)
    outcome = retrain_from_log(MODEL, START, END, dataclasses.replace(served.paths, log_root=shifted),
                               tracking_uri=served.ws.tracking_uri, artifact_root=served.ws.artifact_root)
    bundle = registry.load_bundle(registry.resolve(MODEL, version=outcome.registered.version), tmp_path / "b")
    held = bundle.holdout.height
    np.testing.assert_array_equal(bundle.fitted.matrix(bundle.holdout), x[-held:])
    assert (bundle.fitted.matrix(bundle.holdout)[:, column] >= 1).all()


def test_a_raw_model_log_gets_its_stateless_features_computed_and_keeps_raw_holdout_rows(served, tmp_path):
    """A raw-transaction model logs its raw fields and history features; the stateless ones (computed inside its
    graph) come from the raw fields with the version's spec, and the raw holdout lets the challenger be exported
    --raw-inputs behind the parity gate on real rows."""
    paths = dataclasses.replace(served.paths, log_root=tmp_path / "log", labels_dir=tmp_path / "labels",
                                model_repository=tmp_path / "repo")
    export_model(MODEL, ModelRepository(paths.model_repository), settings=ExportSettings(raw_inputs=True))
    fitted = champion(MODEL).fitted
    stream = generate_transactions(GenerateSpec(rows=2_000, seed=13, fraud_rate=0.05), first_id=3_000_000).sort(
        "timestamp", "transaction_id")
    x = fitted.matrix_raw(stream)
    history = [i for i, f in enumerate(fitted.spec.features) if f.stateful]
    fields = stream.drop("is_fraud").with_columns(pl.col("timestamp").dt.epoch("us"))
    arrow = {pl.Int64: pa.int64(), pl.Float64: pa.float64(), pl.String: pa.string()}
    writer = PredictionLog(Settings({DIR_ENV: str(paths.log_root), RING_SIZE_ENV: "10000", MAX_BYTES_ENV: str(2**40)}),
                           MODEL, 1, [fitted.spec.names[i] for i in history],
                           [(name, arrow[fields.schema[name]]) for name in fields.columns])
    start_us = int(START.timestamp() * 1_000_000)
    ids = stream["transaction_id"].cast(pl.String).to_numpy()
    for lo in range(0, stream.height, 50):
        hi = min(lo + 50, stream.height)
        writer.append(f"raw-{lo}", start_us + lo * 1000, score=np.full(hi - lo, 0.5), features=x[lo:hi, history],
                      raw={c: fields[c].to_numpy()[lo:hi] for c in fields.columns}, transaction_id=ids[lo:hi])
    writer.close(timeout_s=60)
    labels_file = tmp_path / "labels.csv"
    pl.DataFrame({"transaction_id": ids, "label": stream["is_fraud"].cast(pl.Int8),
                  LABELLED_AT: [END.isoformat()] * len(ids)}).write_csv(labels_file)
    ingest_labels(labels_file, paths.labels_dir, pl.Series(ids))

    outcome = retrain_from_log(MODEL, START, END, paths, tracking_uri=served.ws.tracking_uri,
                               artifact_root=served.ws.artifact_root)
    bundle = registry.load_bundle(registry.resolve(MODEL, version=outcome.registered.version), tmp_path / "b")
    held = bundle.holdout.height
    np.testing.assert_array_equal(bundle.fitted.matrix(bundle.holdout), x[-held:])
    assert bundle.raw_holdout.equals(stream.drop("is_fraud").tail(held))
    exported = export_model(MODEL, ModelRepository(paths.model_repository), version=outcome.registered.version,
                            settings=ExportSettings(raw_inputs=True))
    assert exported.parity is not None and exported.parity.rows >= held


def test_too_few_labels_exit_6_and_register_nothing(served):
    mlflow.set_tracking_uri(served.ws.tracking_uri)
    before = _versions()
    done = _treeops("retrain", "--window", "1h", "--end", UNLABELLED_END.isoformat(), ws=served.ws)
    assert done.returncode == EXIT_NO_DATA, done.stderr
    error = json.loads(done.stdout)
    assert error["kind"] == "InsufficientLabelsError" and "0 labelled predictions" in error["error"]
    assert "Nothing was registered" in done.stderr and "Traceback" not in done.stderr
    assert _versions() == before

    with pytest.raises(InsufficientLabelsError, match="fewer than the 5,000"):
        retrain_from_log(MODEL, START, END, served.paths, tracking_uri=served.ws.tracking_uri,
                         artifact_root=served.ws.artifact_root, settings=RetrainSettings(min_labels=5_000))
    assert _versions() == before


def test_a_single_class_is_refused_and_registers_nothing(served, tmp_path):
    mlflow.set_tracking_uri(served.ws.tracking_uri)
    before = _versions()
    negatives = served.labels.with_columns(pl.lit(0, pl.Int8).alias("label"))
    labels_file = tmp_path / "negatives.csv"
    negatives.write_csv(labels_file)
    paths = dataclasses.replace(served.paths, labels_dir=tmp_path / "labels")
    ingest_labels(labels_file, paths.labels_dir, negatives["transaction_id"])
    with pytest.raises(InsufficientLabelsError, match=r"hold 0 positive \(1\) label\(s\)") as caught:
        retrain_from_log(MODEL, START, END, paths, tracking_uri=served.ws.tracking_uri,
                         artifact_root=served.ws.artifact_root)
    assert caught.value.exit_code == EXIT_NO_DATA
    assert _versions() == before


def test_retrain_from_a_file_through_the_cli(served):
    mlflow.set_tracking_uri(served.ws.tracking_uri)
    before = _versions()
    fresh = write_transactions(generate_transactions(GenerateSpec(rows=6_000, seed=21)),
                               served.ws.data_dir / "fresh.parquet")
    done = _treeops("retrain", "--data", str(fresh), "--trigger", "drift-2026-03-01", ws=served.ws)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["version"] == max(before) + 1 and result["alias"] == "challenger"
    assert result["lineage"]["source"] == "file" and result["lineage"]["trigger"] == "drift-2026-03-01"
    tags = MlflowClient().get_model_version(MODEL, str(result["version"])).tags
    assert tags["lineage.data"] == str(fresh) and tags["lineage.rows"] == "6000"
    params = MlflowClient().get_run(result["run_id"]).data.params
    assert (params["max_depth"], params["eta"], params["seed"]) == ("4", "0.2", "5")
    assert registry.aliases(MODEL)["champion"] == 1
