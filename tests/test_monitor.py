"""treeops monitor: drift and one-sided quality verdicts of logged traffic against the version's reference."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
from pathlib import Path

import mlflow
import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.monitor import log_predictions, run_monitor_benchmark
from export.parity import reference_scores
from monitoring.labels import LABELLED_AT, SCHEMA
from monitoring.monitor import (
    LogSchemaError,
    MonitorPaths,
    MonitorSettings,
    evidently_project,
    monitor_version,
    parse_window,
    run_monitor,
    write_gauges,
)
from monitoring.prediction_log import read_window
from monitoring.reference import (
    MAX_REFERENCE_ROWS,
    REFERENCE_DATA_FILE,
    REFERENCE_FILE,
    MissingReferenceError,
    feature_column,
    quality_figures,
    read_reference,
)
from registry import versions as registry
from training.generate import GenerateSpec, generate_transactions
from treeops.errors import EXIT_DRIFT, EXIT_NO_DATA, EXIT_QUALITY, InvalidSettingsError
from triton_fixtures import MODEL

END = dt.datetime(2026, 3, 1, 13, tzinfo=dt.UTC)
START = END - dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    return registry.load_bundle(registry.resolve(MODEL, alias="champion"), tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def reference(trained, bundle):
    return read_reference(trained.repository.version_dir(MODEL, bundle.ref.version))


def traffic(bundle, root, *, drift: float = 0.0, rows: int = 3000, seed: int = 11, failed: int = 0
            ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Generated transactions scored as served, logged through the serving path's writer into `root` and read back
    as the window: the window's rows and the transactions' true labels."""
    raw = generate_transactions(GenerateSpec(rows=rows, seed=seed, drift=drift))
    x = bundle.fitted.matrix_raw(raw)
    ids = raw["transaction_id"].cast(pl.String).to_list()
    log_predictions(root, bundle.fitted.spec.names, x, reference_scores(bundle.booster, x)[:, -1], ids,
                    version=bundle.ref.version, end=END, failed=failed)
    frame = read_window(root, MODEL, START, END)
    labels = pl.DataFrame({"transaction_id": ids, "label": raw["is_fraud"].cast(pl.Int8),
                           LABELLED_AT: [END] * len(ids)}, schema=SCHEMA)
    return frame, labels


def test_export_stores_the_reference_and_holdout_figures(trained, bundle, reference):
    folder = trained.repository.version_dir(MODEL, bundle.ref.version)
    meta = json.loads((folder / REFERENCE_FILE).read_text())
    manifest = json.loads((folder / "treeops.json").read_text())["files"]
    assert {REFERENCE_FILE, REFERENCE_DATA_FILE} <= set(manifest)  # checked like every version file
    assert reference.data.height == min(meta["holdout_rows"], MAX_REFERENCE_ROWS)
    assert reference.feature_columns == [feature_column(f) for f in bundle.fitted.spec.names]
    assert reference.data.schema[reference.feature_columns[0]] == pl.Float32
    # the figures are the holdout's as training measured them (same rows, same threshold)
    for name in ("roc_auc", "pr_auc", "precision", "recall"):
        assert reference.figures[name] == pytest.approx(trained.outcome.metrics[name], abs=1e-6)
    assert 0 <= reference.figures["calibration_error"] < 0.2


def test_a_version_without_a_reference_is_named(tmp_path):
    with pytest.raises(MissingReferenceError, match=str(tmp_path / "3")):
        read_reference(tmp_path / "3")


def test_traffic_like_training_passes_drift_and_quality(bundle, reference, tmp_path):
    frame, labels = traffic(bundle, tmp_path / "log")
    snapshots = []
    window = monitor_version(frame, reference, labels, tmp_path, model=MODEL, start=START, end=END, source="log",
                             record=lambda name, snap: snapshots.append(name))
    assert window.drift is not None and not window.drift.drift_detected
    assert window.labelled == frame.height and window.quality is not None
    assert all(c.passed for c in window.quality), window.quality
    assert window.exit_code == 0
    assert sorted(p.name for p in window.folder.iterdir()) == [
        "drift.html", "drift.json", "quality.html", "quality.json", "result.json"]
    assert json.loads((window.folder / "result.json").read_text())["exit_code"] == 0
    assert [n.split()[0] for n in snapshots] == ["drift", "quality"]


def test_drifted_traffic_exits_3(bundle, reference, tmp_path):
    frame, labels = traffic(bundle, tmp_path / "log", drift=1.0)
    window = monitor_version(frame, reference, labels.head(0), tmp_path, model=MODEL, start=START, end=END,
                             source="log", settings=MonitorSettings(min_labelled=1))
    assert window.drift.drift_detected and window.exit_code == EXIT_DRIFT
    assert window.drift.drifted_columns > window.drift.total_columns / 2


def test_quality_tests_are_one_sided(bundle, reference, tmp_path):
    """Figures far better than the holdout pass (Evidently's two-sided default would fail them); worse ones fail."""
    frame, labels = traffic(bundle, tmp_path / "log")
    worse = dataclasses.replace(reference, figures={**reference.figures, "roc_auc": 0.5, "pr_auc": 0.01,
                                                    "precision": 0.01, "recall": 0.01, "calibration_error": 0.9})
    window = monitor_version(frame, worse, labels, tmp_path / "a", model=MODEL, start=START, end=END, source="log")
    assert all(c.passed for c in window.quality) and window.exit_code == 0

    better = dataclasses.replace(reference, figures={**reference.figures, "roc_auc": 0.9999, "pr_auc": 0.9999})
    window = monitor_version(frame, better, labels, tmp_path / "b", model=MODEL, start=START, end=END, source="log")
    failed = {c.figure for c in window.quality if not c.passed}
    assert failed == {"roc_auc", "pr_auc"} and window.exit_code == EXIT_QUALITY


def test_shuffled_labels_are_a_quality_drop(bundle, reference, tmp_path):
    frame, labels = traffic(bundle, tmp_path / "log")
    shuffled = labels.with_columns(pl.col("label").shuffle(seed=1))
    window = monitor_version(frame, reference, shuffled, tmp_path, model=MODEL, start=START, end=END, source="log")
    roc = next(c for c in window.quality if c.figure == "roc_auc")
    assert not roc.passed and roc.value < 0.6 and window.exit_code == EXIT_QUALITY
    # the Evidently figures are the holdout's definitions applied to the window
    joined = frame.join(shuffled, on="transaction_id")
    expected = quality_figures(joined["label"].to_numpy(), joined["score"].to_numpy(), reference.threshold)
    assert {c.figure: c.value for c in window.quality} == pytest.approx(
        {k: expected[k] for k in ("roc_auc", "pr_auc", "precision", "recall", "calibration_error")}, abs=1e-9)


def test_no_labels_gives_drift_only_and_exit_6(bundle, reference, tmp_path):
    frame, labels = traffic(bundle, tmp_path / "log")
    window = monitor_version(frame, reference, labels.head(0), tmp_path, model=MODEL, start=START, end=END,
                             source="log")
    assert window.quality is None and window.drift is not None and not window.drift.drift_detected
    assert window.exit_code == EXIT_NO_DATA and "treeops labels" in window.skipped[0]
    assert not (window.folder / "quality.json").exists()
    assert json.loads((window.folder / "result.json").read_text())["quality"] is None


def test_too_few_rows_write_nothing(bundle, reference, tmp_path):
    frame, labels = traffic(bundle, tmp_path / "log", rows=1050, failed=1000)
    assert frame.filter(pl.col("error").is_not_null())["score"].null_count() == 1000
    window = monitor_version(frame, reference, labels, tmp_path / "reports", model=MODEL, start=START, end=END,
                             source="the-log")
    assert window.failed_rows == 1000 and window.rows == 50
    assert window.drift is None and window.quality is None and window.exit_code == EXIT_NO_DATA
    assert "the-log" in window.skipped[0] and window.folder is None
    assert not (tmp_path / "reports").exists()


def test_rows_of_another_version_or_schema_are_refused(bundle, reference, tmp_path):
    frame, labels = traffic(bundle, tmp_path / "log", rows=500)
    with pytest.raises(LogSchemaError, match=r"log/version=1 holds rows of version\(s\) \[99\]"):
        monitor_version(frame.with_columns(pl.lit(99, pl.Int64).alias("version")), reference, labels, tmp_path,
                        model=MODEL, start=START, end=END, source="log/version=1")
    with pytest.raises(LogSchemaError, match="another schema"):
        monitor_version(frame.drop(reference.feature_columns[-1]), reference, labels, tmp_path, model=MODEL,
                        start=START, end=END, source="log/version=1")
    assert not (tmp_path / "reports").exists()


def test_windows_reach_the_evidently_workspace_and_the_gauges(bundle, reference, tmp_path):
    from evidently.ui.workspace import Workspace

    frame, labels = traffic(bundle, tmp_path / "log")
    record = evidently_project(tmp_path / "evidently", MODEL)
    window = monitor_version(frame, reference, labels, tmp_path / "reports", model=MODEL, start=START, end=END,
                             source="log", record=record)
    ws = Workspace(str(tmp_path / "evidently"))
    project = ws.search_project(f"treeops {MODEL}")[0]
    assert len(ws.list_runs(project.id)) == 2
    panels = {p.title: [v.metric.rsplit(":", 1)[-1] for v in p.values] for p in project.dashboard.model().panels}
    assert panels["Quality on labelled traffic"] == ["RocAuc", "PrAuc", "Precision", "Recall", "CalibrationError"]
    snapshot = json.loads((window.folder / "quality.json").read_text())
    assert {m["config"]["type"].rsplit(":", 1)[-1] for m in snapshot["metrics"]} == set(
        panels["Quality on labelled traffic"])  # every plotted metric is one the windows record
    metrics = tmp_path / "metrics" / "monitor.prom"
    write_gauges(metrics, [window])
    text = metrics.read_text()
    version = f'model="{MODEL}",version="{reference.version}"'
    assert f"treeops_monitor_drift_share{{{version}}} {window.drift_share}" in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    labels = (("model", MODEL), ("version", str(reference.version)))
    assert samples[("treeops_monitor_window_end_timestamp_seconds", labels)] == window.end.timestamp()
    for check in window.quality:
        assert samples[("treeops_monitor_quality", tuple(sorted((*labels, ("figure", check.figure)))))] == check.value
    for c in window.drift.columns:
        key = tuple(sorted((*labels, ("feature", c.column), ("method", c.method))))
        assert samples[("treeops_monitor_feature_drift_score", key)] == pytest.approx(c.score, rel=1e-12)


@pytest.mark.parametrize("text, seconds", [("1h", 3600), ("30m", 1800), ("1h30m", 5400), ("2d", 172800)])
def test_window_durations(text, seconds):
    assert parse_window(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "1", "h", "0h", "1w", "1h 30m"])
def test_bad_window_durations_are_refused(text):
    with pytest.raises(InvalidSettingsError, match="not a duration"):
        parse_window(text)


@pytest.fixture
def served_workspace(trained, bundle, tmp_path):
    """A workspace holding the trained version's folder and one hour of its logged traffic, labels in a CSV."""
    shutil.copytree(trained.repository.model_dir(MODEL), tmp_path / "model_repository" / MODEL)
    _, labels = traffic(bundle, tmp_path / "prediction_log")
    labels.with_columns(pl.col(LABELLED_AT).dt.strftime("%Y-%m-%dT%H:%M:%S")).write_csv(tmp_path / "labels.csv")
    return tmp_path


def test_cli_labels_then_monitor(served_workspace, treeops):
    ws = served_workspace
    done = treeops("labels", "--data", str(ws / "labels.csv"), "--json", workspace=ws)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["unknown_ids"] == 0
    done = treeops("monitor", "--window", "1h", "--end", END.isoformat(), "--json", workspace=ws)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["exit_code"] == 0 and result["versions"][0]["labelled"] == result["versions"][0]["rows"]
    assert (ws / "metrics" / f"treeops_monitor_{MODEL}.prom").is_file()
    assert Path(result["versions"][0]["folder"]).parent == ws / "reports" / "monitor" / MODEL / "v1"


def test_cli_bad_input_names_the_problem(served_workspace, treeops):
    ws = served_workspace
    done = treeops("monitor", "--window", "1h", "--end", "2020-01-01T00:00:00", workspace=ws)
    assert done.returncode == EXIT_NO_DATA and str(ws / "prediction_log" / f"model={MODEL}") in done.stderr
    assert not (ws / "reports").exists() and not (ws / "metrics").exists()
    (ws / "bad.csv").write_text("id,label\n1,0\n")
    done = treeops("labels", "--data", str(ws / "bad.csv"), workspace=ws)
    assert done.returncode == 1 and "bad.csv lacks column(s) ['transaction_id', 'labelled_at']" in done.stderr
    version_dir = ws / "model_repository" / MODEL / "1"
    (version_dir / REFERENCE_FILE).unlink()
    done = treeops("monitor", "--window", "1h", "--end", END.isoformat(), workspace=ws)
    assert done.returncode == 1 and f"{version_dir} has no training reference" in done.stderr
    assert not (ws / "reports").exists()


def test_monitor_benchmark_runs_small(tmp_path):
    result = run_monitor_benchmark(5000, tmp_path / "bench")
    print("\n".join(result.lines()))
    assert (result.rows, result.labelled) == (5000, 2500)
    assert (Path(result.folder) / "result.json").is_file()


def test_a_segment_under_another_versions_folder_is_named(trained, bundle, tmp_path):
    """A segment of version 99 moved into version 1's folder: refused naming that folder, nothing written."""
    traffic(bundle, tmp_path / "other", rows=500)
    raw = generate_transactions(GenerateSpec(rows=300, seed=5))
    x = bundle.fitted.matrix_raw(raw)
    log_predictions(tmp_path / "log99", bundle.fitted.spec.names, x, reference_scores(bundle.booster, x)[:, -1],
                    raw["transaction_id"].cast(pl.String).to_list(), version=99, end=END)
    shutil.copytree(tmp_path / "other", tmp_path / "ws" / "prediction_log")
    segment = next((tmp_path / "log99").rglob("*.parquet"))
    own = next((tmp_path / "ws" / "prediction_log").rglob("*.parquet")).parent
    shutil.copy(segment, own / f"misplaced-{segment.name}")
    shutil.copytree(trained.repository.model_dir(MODEL), tmp_path / "ws" / "model_repository" / MODEL)
    paths = MonitorPaths.in_workspace(tmp_path / "ws", MODEL)
    folder = paths.log_root / f"model={MODEL}" / f"version={bundle.ref.version}"
    with pytest.raises(LogSchemaError, match=rf"{folder} holds rows of version\(s\) \[99\]"):
        run_monitor(MODEL, START, END, paths)
    assert not paths.reports_dir.exists() and not paths.metrics_file.exists()


def test_labels_of_one_class_skip_quality(bundle, reference, tmp_path):
    frame, labels = traffic(bundle, tmp_path / "log", rows=1000)
    window = monitor_version(frame, reference, labels.with_columns(pl.lit(0, pl.Int8).alias("label")), tmp_path,
                             model=MODEL, start=START, end=END, source="log")
    assert window.quality is None and "both classes" in window.skipped[0] and window.exit_code == EXIT_NO_DATA
