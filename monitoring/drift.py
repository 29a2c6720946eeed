"""Data-drift reports with Evidently 0.7: Polars frames in, HTML + JSON report and a typed verdict out."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from monitoring.errors import DriftInputError, DriftReportError

logger = logging.getLogger(__name__)

MAX_ROWS_PER_FRAME = 50_000
"""Larger frames are down-sampled (without replacement) to this many rows before comparison."""
SAMPLE_SEED = 0
"""Seed of that down-sampling, so a report on the same inputs is reproducible."""

# Metric type tags as they appear in Evidently's snapshot JSON (`Snapshot.json()`).
_DRIFTED_COLUMNS_COUNT = "evidently:metric_v2:DriftedColumnsCount"
_VALUE_DRIFT = "evidently:metric_v2:ValueDrift"
_FAIL = "FAIL"
_ERROR = "ERROR"


@dataclass(frozen=True)
class ColumnDrift:
    """Drift of one column: Evidently's verdict, its score and the method that produced it.

    The direction of ``score`` depends on ``method`` (a distance grows with drift, a p-value
    shrinks), so read ``drifted`` rather than comparing scores yourself.
    """

    column: str
    drifted: bool
    score: float
    method: str


@dataclass(frozen=True)
class DriftResult:
    """Outcome of :func:`run_drift_report`, plus where its reports were written."""

    drift_detected: bool
    """Evidently's dataset verdict: its ``DriftedColumnsCount`` test failed."""
    drifted_columns: int
    total_columns: int
    columns: tuple[ColumnDrift, ...]
    html_path: Path
    json_path: Path

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (paths as strings, columns as a list of dicts)."""
        return {
            "drift_detected": self.drift_detected,
            "drifted_columns": self.drifted_columns,
            "total_columns": self.total_columns,
            "columns": [
                {"column": c.column, "drifted": c.drifted, "score": c.score, "method": c.method}
                for c in self.columns
            ],
            "html_path": str(self.html_path),
            "json_path": str(self.json_path),
        }


def run_drift_report(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    columns: Sequence[str],
    out_dir: Path,
    name: str = "drift",
    categorical: Sequence[str] = (),
) -> DriftResult:
    """Compare ``current`` with ``reference`` on ``columns`` using Evidently's data drift preset.

    Columns in ``categorical`` are declared categorical, all others numerical (they must have a
    numeric dtype). Evidently picks the test per column; the dataset is drifted when at least
    half of the columns drift. Each frame larger than ``MAX_ROWS_PER_FRAME`` rows is
    down-sampled to that size with seed ``SAMPLE_SEED`` (a 50k x 10-column report takes about 2.5 s on 2 cores).
    Nulls are ignored; Evidently also silently ignores +/-inf.

    Writes ``<out_dir>/<name>.html`` and ``<out_dir>/<name>.json`` (Evidently's
    ``Snapshot.json()``: metrics and test results), each via a temporary file and an atomic
    rename, and returns the verdicts read from Evidently's tests.

    Raises:
        DriftInputError: a column is missing, all-null or (if numerical) non-numeric, a frame
            is empty, or the arguments are inconsistent.
        DriftReportError: Evidently's output lacks the expected drift tests.
    """
    columns = list(columns)
    categorical = list(categorical)
    _validate(reference, current, columns, categorical, name)

    # Imported here: `import evidently` takes 4-5 s, too much for every CLI start.
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    started = time.perf_counter()
    definition = DataDefinition(
        numerical_columns=[c for c in columns if c not in categorical],
        categorical_columns=categorical,
    )
    datasets = {
        label: Dataset.from_pandas(_sample(frame.select(columns), label).to_pandas(), data_definition=definition)
        for label, frame in (("current", current), ("reference", reference))
    }
    report = Report([DataDriftPreset(columns=columns)], include_tests=True)
    snapshot = report.run(datasets["current"], datasets["reference"])  # current first

    snapshot_json = snapshot.json()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / f"{name}.html", out_dir / f"{name}.json"
    _write_atomic(html_path, snapshot.get_html_str(as_iframe=False))
    _write_atomic(json_path, snapshot_json)

    result = _parse_snapshot(json.loads(snapshot_json), columns, html_path, json_path)
    logger.info(
        "drift report %s: %d/%d columns drifted, drift_detected=%s (%.1f s)",
        json_path,
        result.drifted_columns,
        result.total_columns,
        result.drift_detected,
        time.perf_counter() - started,
    )
    return result


def _validate(
    reference: pl.DataFrame, current: pl.DataFrame, columns: list[str], categorical: list[str], name: str
) -> None:
    if not columns:
        raise DriftInputError("`columns` is empty; pass the feature columns to compare.")
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise DriftInputError(f"`columns` lists {duplicates} more than once; pass each column once.")
    unknown = [c for c in categorical if c not in columns]
    if unknown:
        raise DriftInputError(f"`categorical` names {unknown}, which are not in `columns`; add them to `columns`.")
    if not name or Path(name).name != name or name in {".", ".."}:
        raise DriftInputError(f"report name {name!r} is not a plain file name; pass e.g. 'drift-2024-06-01'.")

    for label, frame in (("reference", reference), ("current", current)):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DriftInputError.missing_columns(label, missing, frame.columns)
        if frame.height == 0:
            raise DriftInputError.empty_frame(label)
        for column in columns:
            dtype = frame.schema[column]
            if column not in categorical and not dtype.is_numeric():
                raise DriftInputError.not_numeric(column, str(dtype))
            if frame[column].null_count() == frame.height:
                raise DriftInputError.all_null(label, column)


def _sample(frame: pl.DataFrame, label: str) -> pl.DataFrame:
    if frame.height <= MAX_ROWS_PER_FRAME:
        return frame
    logger.info("sampling %s data: %d of %d rows (seed %d)", label, MAX_ROWS_PER_FRAME, frame.height, SAMPLE_SEED)
    return frame.sample(n=MAX_ROWS_PER_FRAME, seed=SAMPLE_SEED)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the complete new one, never a part."""
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as tmp:
        tmp_path = Path(tmp.name)
        try:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            tmp.close()
            tmp_path.unlink(missing_ok=True)
            raise
    try:
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _parse_snapshot(snapshot: dict[str, Any], columns: list[str], html_path: Path, json_path: Path) -> DriftResult:
    """Read verdicts from the test statuses in Evidently's snapshot dict, scores from its metrics."""
    metrics = {m["id"]: m for m in snapshot["metrics"]}
    dataset_status: str | None = None
    drifted_count: int | None = None
    per_column: dict[str, ColumnDrift] = {}
    for test in snapshot["tests"]:
        metric = metrics.get(test["metric_config"]["metric_id"])
        if metric is None:
            continue
        kind, status = metric["config"]["type"], test["status"]
        if kind == _DRIFTED_COLUMNS_COUNT:
            dataset_status, drifted_count = status, int(metric["value"]["count"])
        elif kind == _VALUE_DRIFT:
            column = metric["config"]["column"]
            if status == _ERROR:
                raise DriftReportError(
                    f"Evidently could not test drift of column `{column}`: {test['description']}; "
                    "check the column's values."
                )
            per_column[column] = ColumnDrift(
                column=column,
                drifted=status == _FAIL,
                score=float(metric["value"]),
                method=str(metric["config"]["method"]),
            )

    absent = [c for c in columns if c not in per_column]
    if dataset_status in (None, _ERROR) or drifted_count is None or absent:
        raise DriftReportError(
            f"Evidently's report lacks the dataset drift test (status {dataset_status}) or column tests for "
            f"{absent}; check that evidently 0.7.x is installed and see {json_path}."
        )
    return DriftResult(
        drift_detected=dataset_status == _FAIL,
        drifted_columns=drifted_count,
        total_columns=len(columns),
        columns=tuple(per_column[c] for c in columns),
        html_path=html_path,
        json_path=json_path,
    )
