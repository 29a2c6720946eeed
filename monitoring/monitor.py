"""`treeops monitor`: one window of the prediction log against each served version's training reference.

Per version in the window: Evidently data drift of every served feature and of the score against the version's
reference sample (monitoring/drift.py's preset and verdict), and where labels arrived, classification quality
against the version's holdout figures with one-sided Evidently tests (`gte` for ROC AUC, PR AUC, precision and
recall at the served threshold, `lte` for the calibration error). Evidently's own default test against a
reference is `eq(Reference(relative=0.2))`, two-sided: it also fails a model that got better, so it is not used.
Verdicts are the statuses of Evidently's tests. Each version's window is written whole (a staging folder renamed)
to `<out>/<model>/v<version>/<start>--<end>/`: drift.html/json, quality.html/json (when computed) and
result.json; both snapshots are added to the Evidently workspace project named after the model.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
from evidently import BinaryClassification, DataDefinition, Dataset, Report
from evidently.core.metric_types import SingleValueCalculation, SingleValueMetric
from evidently.metrics import Precision, Recall, RocAuc
from evidently.presets import DataDriftPreset
from evidently.tests import gte, lte
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from monitoring import drift
from monitoring.errors import MonitoringError
from monitoring.labels import LABEL, join_labels
from monitoring.log_store import as_log_root
from monitoring.reference import FEATURE_PREFIX, RAW_PREFIX, SCORE, Reference, calibration_error, feature_column
from training.features import FittedFeatures, load_fitted
from treeops.errors import EXIT_DRIFT, EXIT_NO_DATA, EXIT_QUALITY, InvalidSettingsError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

#: Columns of the prediction log (monitoring/prediction_log.py) the monitor reads besides `feature.<name>`.
VERSION, ERROR = "version", "error"
_PASS, _FAIL = "SUCCESS", "FAIL"
_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Pushgateway job of the gauges a run pushes (their group: this job and the model).
PUSH_JOB = "treeops_monitor"
PUSH_TIMEOUT_S = 10.0
#: The port the printed `evidently ui` command uses: its default, 8000, is Triton's HTTP port.
EVIDENTLY_UI_PORT = 8080


class MonitorSettings(BaseSettings):
    """How much data a verdict needs and how far below its holdout a figure may fall. Env `TREEOPS_MONITOR_`."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_MONITOR_", extra="forbid", frozen=True)

    min_rows: int = Field(200, ge=1, description="answered predictions of a version below which no verdict is given")
    min_labelled: int = Field(100, ge=1, description="labelled predictions below which quality is not tested")
    max_roc_auc_drop: float = Field(0.05, ge=0, description="ROC AUC may fall this far below the holdout's")
    max_pr_auc_drop: float = Field(0.10, ge=0, description="PR AUC may fall this far below the holdout's")
    max_precision_drop: float = Field(0.10, ge=0, description="precision at the threshold: allowed fall")
    max_recall_drop: float = Field(0.10, ge=0, description="recall at the threshold: allowed fall")
    max_calibration_error_rise: float = Field(0.05, ge=0, description="calibration error may rise this much")
    max_quality_rows: int = Field(200_000, ge=1, description="labelled rows scored at most (seeded sample above)")
    pushgateway_url: str | None = Field(
        None, pattern=r"^https?://\S+$", description="Prometheus Pushgateway the gauges are also pushed to after "
        f"each run (job {PUSH_JOB}, grouped by model), as a CronJob needs; None: the text file only")


class PrAuc(SingleValueMetric):
    """Area under the precision-recall curve (average precision) of `score` for `target` (Evidently 0.7 has none)."""

    target: str
    score: str


class PrAucCalculation(SingleValueCalculation[PrAuc]):
    def calculate(self, context: Any, current_data: Dataset, reference_data: Dataset | None) -> Any:
        from sklearn.metrics import average_precision_score

        frame = current_data.as_dataframe()
        return self.result(float(average_precision_score(frame[self.metric.target], frame[self.metric.score])))

    def display_name(self) -> str:
        return "PR AUC"


class CalibrationError(SingleValueMetric):
    """Expected calibration error of `score` for `target` (monitoring.reference.calibration_error)."""

    target: str
    score: str


class CalibrationErrorCalculation(SingleValueCalculation[CalibrationError]):
    def calculate(self, context: Any, current_data: Dataset, reference_data: Dataset | None) -> Any:
        frame = current_data.as_dataframe()
        return self.result(calibration_error(frame[self.metric.target].to_numpy(), frame[self.metric.score].to_numpy()))

    def display_name(self) -> str:
        return "Expected calibration error"


def parse_end(text: str | None) -> dt.datetime:
    """`--end`: an ISO 8601 time (naive: UTC); None: now, to the second."""
    if text is None:
        return dt.datetime.now(dt.UTC).replace(microsecond=0)
    try:
        end = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidSettingsError(f"--end {text!r} is not an ISO 8601 time, e.g. 2026-03-01T13:00:00") from None
    return end.replace(tzinfo=dt.UTC) if end.tzinfo is None else end.astimezone(dt.UTC)


def parse_window(text: str) -> dt.timedelta:
    """`1h`, `30m`, `1h30m`, `2d`: a positive duration."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text or not (seconds := sum(int(n) * _UNIT_S[u] for n, u in parts)):
        raise InvalidSettingsError(f"--window {text!r} is not a duration; give e.g. 1h, 30m, 1h30m or 2d")
    return dt.timedelta(seconds=seconds)


class InsufficientDataError(MonitoringError):
    """Too little data for any verdict of the window (exit 6); nothing was written."""

    exit_code = EXIT_NO_DATA


class QualityDropError(MonitoringError):
    """A quality figure on labelled traffic fell below the version's holdout bound (exit 5)."""

    exit_code = EXIT_QUALITY


class GaugePushError(MonitoringError):
    """The run's gauges did not reach the Pushgateway (everything else of the run was written)."""


class LogSchemaError(MonitoringError):
    """Logged rows do not match the version's reference (another version's or schema's segment)."""


class QualityReportError(MonitoringError):
    """Evidently's quality report lacks a test this module relies on, or a test errored."""


@dataclass(frozen=True)
class QualityCheck:
    """One one-sided test: `value` on the window's labelled rows vs `bound` from the holdout's `holdout`."""

    figure: str
    value: float
    holdout: float
    bound: float
    direction: str  # ">=" or "<="
    passed: bool


@dataclass(frozen=True)
class VersionWindow:
    """One version's window: row counts, the verdicts computed (None: not computed, and why) and the reports."""

    model: str
    version: int
    start: dt.datetime
    end: dt.datetime
    rows: int
    failed_rows: int
    labelled: int
    drift: drift.DriftResult | None
    quality: tuple[QualityCheck, ...] | None
    skipped: tuple[str, ...]  # why a verdict was not computed
    folder: Path | None

    @property
    def drift_share(self) -> float | None:
        return None if self.drift is None else self.drift.drifted_columns / self.drift.total_columns

    @property
    def quality_dropped(self) -> bool:
        return any(not c.passed for c in self.quality or ())

    @property
    def exit_code(self) -> int:
        """5 quality drop, else 3 drift, else 6 a verdict not computed, else 0."""
        if self.quality_dropped:
            return EXIT_QUALITY
        if self.drift is not None and self.drift.drift_detected:
            return EXIT_DRIFT
        return EXIT_NO_DATA if self.skipped else 0

    def figure(self, name: str) -> float | None:
        return next((c.value for c in self.quality or () if c.figure == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "version": self.version, "start": self.start.isoformat(), "end": self.end.isoformat(),
            "rows": self.rows, "failed_rows": self.failed_rows, "labelled": self.labelled,
            "drift": None if self.drift is None else self.drift.to_dict(), "drift_share": self.drift_share,
            "quality": None if self.quality is None else [c.__dict__ for c in self.quality],
            "quality_dropped": self.quality_dropped, "skipped": list(self.skipped), "exit_code": self.exit_code,
            "folder": None if self.folder is None else str(self.folder),
        }


@dataclass(frozen=True)
class MonitorResult:
    """Every version's window; the exit code is the most severe of theirs (5 > 3 > 6 > 0)."""

    model: str
    start: dt.datetime
    end: dt.datetime
    versions: tuple[VersionWindow, ...]
    metrics_file: Path | None = None
    workspace: Path | None = None

    @property
    def exit_code(self) -> int:
        codes = {v.exit_code for v in self.versions}
        return next((c for c in (EXIT_QUALITY, EXIT_DRIFT, EXIT_NO_DATA) if c in codes), 0)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "start": self.start.isoformat(), "end": self.end.isoformat(),
                "exit_code": self.exit_code, "versions": [v.to_dict() for v in self.versions],
                "metrics_file": None if self.metrics_file is None else str(self.metrics_file),
                "evidently_workspace": None if self.workspace is None else str(self.workspace)}

    def lines(self) -> list[str]:
        out = [f"monitor {self.model} {self.start:%Y-%m-%d %H:%M} .. {self.end:%Y-%m-%d %H:%M} UTC"]
        for v in self.versions:
            head = f"  version {v.version}: {v.rows:,} predictions ({v.failed_rows:,} failed), {v.labelled:,} labelled"
            out.append(head)
            if v.drift is not None:
                verdict = "DRIFT" if v.drift.drift_detected else "no drift"
                out.append(f"    {verdict}: {v.drift.drifted_columns} of {v.drift.total_columns} columns drifted")
            for c in v.quality or ():
                out.append(f"    {'ok  ' if c.passed else 'DROP'} {c.figure} {c.value:.4f} (holdout {c.holdout:.4f}, "
                           f"must be {c.direction} {c.bound:.4f})")
            out += [f"    not computed: {why}" for why in v.skipped]
            if v.folder is not None:
                out.append(f"    reports: {v.folder}")
        if self.workspace is not None:
            out.append(f"  Evidently: evidently ui --workspace {self.workspace} --port {EVIDENTLY_UI_PORT}, then "
                       f"http://127.0.0.1:{EVIDENTLY_UI_PORT}")
        if self.metrics_file is not None:
            out.append(f"  Prometheus gauges: {self.metrics_file}")
        return out


def window_folder(out_dir: Path, model: str, version: int, start: dt.datetime, end: dt.datetime) -> Path:
    return out_dir / model / f"v{version}" / f"{start:%Y%m%dT%H%M%SZ}--{end:%Y%m%dT%H%M%SZ}"


def monitor_version(
    rows: pl.DataFrame, reference: Reference, labels: pl.DataFrame, out_dir: Path, *, model: str,
    start: dt.datetime, end: dt.datetime, source: str, settings: MonitorSettings | None = None,
    record: Callable[[str, Any], None] | None = None,
) -> VersionWindow:
    """Monitor one version's logged `rows` of the window (the log's columns) against its `reference`.

    `source`: the log folder the rows came from (named in errors). `record(name, snapshot)` receives each
    Evidently snapshot computed (the workspace project). Nothing is written when no verdict is computed.

    Raises:
        LogSchemaError: rows of another version, or feature columns other than the reference's.
    """
    settings = settings or MonitorSettings()
    _check_schema(rows, reference, source)
    answered = rows.filter(pl.col(ERROR).is_null())
    failed = rows.height - answered.height
    joined = join_labels(answered, labels)
    labelled = joined.filter(pl.col(LABEL).is_not_null())
    base = dict(model=model, version=reference.version, start=start, end=end, rows=answered.height,
                failed_rows=failed, labelled=labelled.height)
    if answered.height < settings.min_rows:
        why = (f"{answered.height} answered predictions of version {reference.version} in {source} for the window, "
               f"fewer than min_rows {settings.min_rows} (TREEOPS_MONITOR_MIN_ROWS)")
        return VersionWindow(**base, drift=None, quality=None, skipped=(why,), folder=None)

    final = window_folder(out_dir, model, reference.version, start, end)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    snapshots: list[tuple[str, Any]] = []
    try:
        drifted = _drift(reference, answered, staging, final, end, snapshots)
        skipped: tuple[str, ...] = ()
        quality = None
        if labelled.height < settings.min_labelled:
            skipped = (f"quality: {labelled.height} of {answered.height} predictions have labels, fewer than "
                       f"min_labelled {settings.min_labelled}; ingest them with `treeops labels --data FILE`",)
        elif labelled[LABEL].n_unique() < 2:
            skipped = (f"quality: all {labelled.height} labelled predictions have label {labelled[LABEL][0]}; ROC "
                       "and PR AUC need both classes: widen --window or ingest more labels",)
        else:
            quality = _quality(labelled, reference, settings, staging, end, snapshots)
        result = VersionWindow(**base, drift=drifted, quality=quality, skipped=skipped, folder=final)
        drift._write_atomic(staging / "result.json", json.dumps(result.to_dict(), indent=2, default=str))
        if final.exists():  # the same window monitored again: the new run replaces it
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name, snapshot in snapshots:
        if record is not None:
            record(f"{name} v{reference.version} {start:%Y-%m-%d %H:%M}..{end:%H:%M}", snapshot)
    return result


def with_stateless_features(rows: pl.DataFrame, reference: Reference) -> pl.DataFrame:
    """A raw-transaction model logs its raw fields (`raw.*`) and the history features it read from the store; its
    stateless features are computed inside its ONNX graph and not logged. They are computed here from the logged raw
    fields with the version's own fitted spec (the same declaration, so the same values), in the reference's column
    order. Rows that already carry every feature, or lack the raw fields to compute them, are returned as they are
    (the schema check then names what is missing)."""
    missing = [c for c in reference.feature_columns if c not in rows.columns]
    raw = [c for c in rows.columns if c.startswith(RAW_PREFIX)]
    if not missing or not raw:
        return rows
    fitted = load_fitted(json.loads((reference.version_dir / "feature_spec.json").read_text()))
    stateless = [f for f in fitted.spec.features if not f.stateful and feature_column(f.name) in missing]
    if len(stateless) != len(missing) or not all(RAW_PREFIX + c in rows.columns for c in fitted.spec.raw_schema):
        return rows
    frame = rows.select(pl.col(RAW_PREFIX + c).cast(pl.Int64 if dtype.is_temporal() else dtype).cast(dtype).alias(c)
                        for c, dtype in fitted.spec.raw_schema.items())
    subset = FittedFeatures(dataclasses.replace(fitted.spec, features=tuple(stateless)), fitted.vocabularies)
    computed = subset.encode(subset.spec.compute(frame.lazy())).collect()
    completed = rows.with_columns(computed[f.name].alias(feature_column(f.name)) for f in stateless)
    others = [c for c in completed.columns if not c.startswith(FEATURE_PREFIX)]
    return completed.select(*others, *reference.feature_columns)


def _check_schema(rows: pl.DataFrame, reference: Reference, source: str) -> None:
    versions = rows[VERSION].unique().drop_nulls().to_list() if VERSION in rows.columns else []
    other = sorted(v for v in versions if int(v) != reference.version)
    if other:
        raise LogSchemaError(f"{source} holds rows of version(s) {other}, but its reference is version "
                             f"{reference.version} ({reference.version_dir}); a segment was written under another "
                             "version's folder: move or delete it")
    logged = [c for c in rows.columns if c.startswith("feature.")]
    if logged != reference.feature_columns or SCORE not in rows.columns:
        raise LogSchemaError(f"{source} logs features {logged} (and score: {SCORE in rows.columns}), but version "
                             f"{reference.version}'s reference in {reference.version_dir} has "
                             f"{reference.feature_columns}: the segment was written with another schema")


def _drift(reference: Reference, answered: pl.DataFrame, folder: Path, final: Path, end: dt.datetime,
           snapshots: list) -> drift.DriftResult:
    """drift.py's preset and verdict over the served features and the score."""
    columns = [*reference.feature_columns, SCORE]
    categorical = [c for c, f in zip(reference.feature_columns, reference.features) if f in reference.categorical]
    drift._validate(reference.data, answered, columns, categorical, "drift")
    definition = DataDefinition(numerical_columns=[c for c in columns if c not in categorical],
                                categorical_columns=categorical)
    current, ref = (Dataset.from_pandas(drift._sample(f.select(columns), label).to_pandas(), data_definition=definition)
                    for f, label in ((answered, "current"), (reference.data, "reference")))
    snapshot = Report([DataDriftPreset(columns=columns)], include_tests=True).run(current, ref, timestamp=end)
    text = snapshot.json()
    drift._write_atomic(folder / "drift.html", snapshot.get_html_str(as_iframe=False))
    drift._write_atomic(folder / "drift.json", text)
    snapshots.append(("drift", snapshot))
    return drift._parse_snapshot(json.loads(text), columns, final / "drift.html", final / "drift.json")


_BOUNDS = {  # figure -> (settings field of its allowed change, direction of the one-sided test)
    "roc_auc": ("max_roc_auc_drop", ">="), "pr_auc": ("max_pr_auc_drop", ">="),
    "precision": ("max_precision_drop", ">="), "recall": ("max_recall_drop", ">="),
    "calibration_error": ("max_calibration_error_rise", "<="),
}


def _quality(labelled: pl.DataFrame, reference: Reference, settings: MonitorSettings, folder: Path,
             end: dt.datetime, snapshots: list) -> tuple[QualityCheck, ...]:
    frame = labelled.select(pl.col(SCORE), pl.col(LABEL).cast(pl.Int64))
    if frame.height > settings.max_quality_rows:
        frame = frame.sample(settings.max_quality_rows, seed=drift.SAMPLE_SEED)
    bounds = {}
    for name, (setting, direction) in _BOUNDS.items():
        holdout, allowed = reference.figures[name], getattr(settings, setting)
        bounds[name] = (holdout, holdout - allowed if direction == ">=" else holdout + allowed, direction)
    test = {n: (gte if d == ">=" else lte)(b) for n, (_, b, d) in bounds.items()}
    thr = reference.threshold
    metrics = {"roc_auc": RocAuc(tests=[test["roc_auc"]]),
               "pr_auc": PrAuc(target=LABEL, score=SCORE, tests=[test["pr_auc"]]),
               "precision": Precision(probas_threshold=thr, tests=[test["precision"]]),
               "recall": Recall(probas_threshold=thr, tests=[test["recall"]]),
               "calibration_error": CalibrationError(target=LABEL, score=SCORE, tests=[test["calibration_error"]])}
    definition = DataDefinition(classification=[BinaryClassification(target=LABEL, prediction_probas=SCORE)],
                                numerical_columns=[SCORE])
    current = Dataset.from_pandas(frame.to_pandas(), data_definition=definition)
    snapshot = Report(list(metrics.values())).run(current, None, timestamp=end)
    text = snapshot.json()
    drift._write_atomic(folder / "quality.html", snapshot.get_html_str(as_iframe=False))
    drift._write_atomic(folder / "quality.json", text)
    snapshots.append(("quality", snapshot))
    return _parse_quality(json.loads(text), metrics, bounds, folder / "quality.json")


def _parse_quality(snapshot: dict[str, Any], metrics: dict[str, Any], bounds: dict, path: Path
                   ) -> tuple[QualityCheck, ...]:
    """Each figure's value from its metric and its verdict from its one test's status."""
    by_type = {m["config"]["type"].rsplit(":", 1)[-1]: m for m in snapshot["metrics"]}
    status = {t["metric_config"]["metric_id"]: t for t in snapshot["tests"]}
    checks = []
    for name, metric in metrics.items():
        found = by_type.get(type(metric).__name__)
        test = status.get(found["id"]) if found else None
        if test is None or test["status"] not in (_PASS, _FAIL):
            raise QualityReportError(f"Evidently's quality report {path} has no verdict for {name} "
                                     f"({test['description'] if test else 'no test'}); check the labels and scores")
        holdout, bound, direction = bounds[name]
        checks.append(QualityCheck(name, float(found["value"]), holdout, bound, direction, test["status"] == _PASS))
    return tuple(checks)


def evidently_project(workspace: Path, model: str) -> Callable[[str, Any], None]:
    """A recorder adding each snapshot to the local Evidently workspace's project `treeops <model>` (created on
    first use), for `evidently ui --workspace <workspace>`."""
    from evidently.ui.workspace import Workspace as EvidentlyWorkspace

    ws = EvidentlyWorkspace.create(str(workspace))
    name = f"treeops {model}"
    found = ws.search_project(name)
    project = found[0] if found else _new_project(ws, name, model)

    def record(run_name: str, snapshot: Any) -> None:
        ws.add_run(project.id, snapshot, name=run_name)

    return record


#: Dashboard panels of a new project: metric type (as Evidently names it) -> legend, per tab.
_PANELS = {
    "Drift": ("Share of drifted columns (features and score)", {"DriftedColumnsCount": "drift share"}),
    "Quality": ("Quality on labelled traffic", {"RocAuc": "ROC AUC", "PrAuc": "PR AUC", "Precision": "precision",
                                                "Recall": "recall", "CalibrationError": "calibration error"}),
}


def _new_project(ws: Any, name: str, model: str) -> Any:
    """A project whose dashboard plots each window's drift share and quality figures over time."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel

    project = ws.create_project(name, description=f"treeops monitor windows of model {model}")
    for tab, (title, metrics) in _PANELS.items():
        values = [PanelMetric(legend=legend, metric=metric,
                              metric_labels={"value_type": "share"} if metric == "DriftedColumnsCount" else {})
                  for metric, legend in metrics.items()]
        project.dashboard.add_panel(line_plot_panel(title, values), tab=tab)
    return project


def write_gauges(path: Path, windows: Sequence[VersionWindow]) -> None:
    """The monitor's gauges as a Prometheus text file, replaced atomically: for node exporter's textfile collector
    (`--collector.textfile.directory`) or any server exposing the file."""
    from prometheus_client import write_to_textfile

    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), _gauges(windows))


def push_gauges(url: str, model: str, windows: Sequence[VersionWindow], *, written: Path | None = None) -> None:
    """Replace group {job=PUSH_JOB, model=`model`} on the Pushgateway at `url` with the windows' gauges (HTTP PUT).

    Raises:
        GaugePushError: the Pushgateway did not take them (`written`: the text file that holds them anyway).
    """
    from prometheus_client import push_to_gateway

    try:
        push_to_gateway(url, job=PUSH_JOB, grouping_key={"model": model}, registry=_gauges(windows),
                        timeout=PUSH_TIMEOUT_S)
    except OSError as exc:
        kept = f"; the reports, the Evidently workspace and {written} were written" if written else ""
        raise GaugePushError(f"pushing the monitor's gauges of {model} to the Pushgateway {url} failed ({exc}){kept}: "
                             "check TREEOPS_MONITOR_PUSHGATEWAY_URL and that the Pushgateway is up") from exc


def _gauges(windows: Sequence[VersionWindow]) -> CollectorRegistry:
    """A registry of the monitor's gauges (monitoring/metric_names.py); only figures that were computed are set."""
    from prometheus_client import CollectorRegistry, Gauge

    from monitoring import metric_names as names

    registry = CollectorRegistry()

    def gauge(metric: names.Metric) -> Gauge:
        return Gauge(metric.name, metric.help, metric.labels, registry=registry)

    share, per_column = gauge(names.MONITOR_DRIFT_SHARE), gauge(names.MONITOR_FEATURE_DRIFT)
    quality, window_end = gauge(names.MONITOR_QUALITY), gauge(names.MONITOR_WINDOW_END)
    for w in windows:
        labels = {"model": w.model, "version": str(w.version)}
        window_end.labels(**labels).set(w.end.timestamp())
        if w.drift is not None:
            share.labels(**labels).set(w.drift_share)
            for c in w.drift.columns:
                per_column.labels(**labels, feature=c.column, method=c.method).set(c.score)
        for check in w.quality or ():
            quality.labels(**labels, figure=check.figure).set(check.value)
    return registry


@dataclass(frozen=True)
class MonitorPaths:
    """Where `run_monitor` reads and writes (all inside a treeops workspace by default)."""

    log_root: Path | str  # a folder or an s3:// URI
    model_repository: Path
    labels_dir: Path
    reports_dir: Path
    evidently_workspace: Path
    metrics_file: Path

    @classmethod
    def in_workspace(cls, root: Path, model: str, log_root: Path | str | None = None) -> MonitorPaths:
        """`<root>/prediction_log` (the log contract's default; or `log_root`, a folder or `s3://bucket/prefix`),
        `model_repository`, `labels`, `reports/monitor`, `evidently` (the Evidently UI's workspace) and
        `metrics/treeops_monitor_<model>.prom`."""
        return cls(as_log_root(log_root) if log_root else root / "prediction_log", root / "model_repository",
                   root / "labels", root / "reports" / "monitor", root / "evidently",
                   root / "metrics" / f"treeops_monitor_{model}.prom")


def run_monitor(model: str, start: dt.datetime, end: dt.datetime, paths: MonitorPaths, *,
                version: int | None = None, settings: MonitorSettings | None = None) -> MonitorResult:
    """Monitor every version of `model` logged in [start, end) (or only `version`) against its reference.

    Raises:
        InsufficientDataError: the window holds no logged prediction of the model (or version).
        MissingReferenceError: a logged version's folder has no training reference.
        LogSchemaError: a version's rows do not match its reference.
        GaugePushError: `settings.pushgateway_url` is set and the push failed (after everything else was written).
    """
    from monitoring.labels import read_labels
    from monitoring.prediction_log import logged_versions, read_window
    from monitoring.reference import read_reference

    model_dir = f"{paths.log_root}/model={model}"
    logged = [version] if version is not None else logged_versions(paths.log_root, model)
    # one read per version folder, so a segment written under another version's folder is caught by its rows
    by_version = {v: rows for v in logged if (rows := read_window(paths.log_root, model, start, end, version=v)).height}
    if not by_version:
        which = f"version {version} of model {model}" if version is not None else f"model {model}"
        raise InsufficientDataError(f"no logged predictions of {which} in {model_dir} from {start.isoformat()} to "
                                    f"{end.isoformat()}; nothing was written. Check --end/--window and that serving "
                                    "logs predictions")
    references = {v: read_reference(paths.model_repository / model / str(v)) for v in by_version}
    by_version = {v: with_stateless_features(rows, references[v]) for v, rows in by_version.items()}
    for v, rows in by_version.items():  # every version's input checked before anything is written
        _check_schema(rows, references[v], f"{model_dir}/version={v}")
    labels = read_labels(paths.labels_dir)
    record = evidently_project(paths.evidently_workspace, model)
    windows = [monitor_version(rows, references[v], labels, paths.reports_dir, model=model, start=start, end=end,
                               source=f"{model_dir}/version={v}", settings=settings, record=record)
               for v, rows in by_version.items()]
    write_gauges(paths.metrics_file, windows)
    settings = settings or MonitorSettings()
    if settings.pushgateway_url is not None:
        push_gauges(settings.pushgateway_url, model, windows, written=paths.metrics_file)
    return MonitorResult(model, start, end, tuple(windows), paths.metrics_file, paths.evidently_workspace)
