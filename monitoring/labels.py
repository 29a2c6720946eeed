"""Ground truth that arrives after the predictions: ingested from files, stored in the workspace, joined by id.

Each ingest writes one Parquet file `<labels_dir>/labels-<UTC time>-<hex>.parquet` (temp name + rename, so a
reader sees it whole or not at all) with `transaction_id` (Utf8, as the prediction log has it), `label` (Int8,
0/1) and `labelled_at` (Datetime us UTC). Reading takes every file and keeps, per transaction, the row with the
latest `labelled_at` (a relabel supersedes the first label; on equal times the later ingest wins).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from monitoring.errors import MonitoringError

log = logging.getLogger(__name__)

ID, LABEL, LABELLED_AT = "transaction_id", "label", "labelled_at"
COLUMNS = (ID, LABEL, LABELLED_AT)
SCHEMA = {ID: pl.String(), LABEL: pl.Int8(), LABELLED_AT: pl.Datetime("us", "UTC")}


class LabelsError(MonitoringError):
    """A labels file that cannot be ingested; the message names the file, the column or rows, and the fix."""


@dataclass(frozen=True)
class IngestResult:
    """What one ingest did: rows read, rows kept after duplicates, ids not in the prediction log, where stored."""

    source: str
    rows: int
    duplicates: int  # rows of the file superseded by a later labelled_at of the same transaction in it
    stored: int
    unknown_ids: int  # stored ids that no logged prediction of the model carries (yet)
    unknown_examples: tuple[str, ...]
    path: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def load_labels_file(path: Path) -> pl.DataFrame:
    """Read and check a labels file (CSV or Parquet): exactly the columns it needs, labels 0/1, times that parse.

    Raises:
        LabelsError: a column is missing, an id or time is empty or unparsable, or a label is not 0/1.
    """
    from training.errors import DataError
    from training.ingest import scan_table

    try:
        frame = scan_table(path).collect()
    except (DataError, pl.exceptions.PolarsError, OSError) as exc:
        raise LabelsError(f"labels file {path} cannot be read: {exc}") from exc
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise LabelsError(f"labels file {path} lacks column(s) {missing}; it has {frame.columns}. A labels file has "
                          f"columns {list(COLUMNS)} (label 0 or 1, labelled_at an ISO 8601 time, UTC if no zone)")
    if frame.height == 0:
        raise LabelsError(f"labels file {path} has no rows; nothing to ingest")
    ids = frame[ID].cast(pl.String)
    label = frame[LABEL].cast(pl.Int8, strict=False) if frame[LABEL].dtype != pl.String else \
        frame[LABEL].str.strip_chars().cast(pl.Int8, strict=False)
    at = _utc(frame[LABELLED_AT], path)
    for name, bad in ((ID, ids.is_null()), (LABEL, label.is_null() | ~label.is_in([0, 1])), (LABELLED_AT, at.is_null())):
        if bad.any():
            rows = (bad.arg_true() + 1).head(5).to_list()
            raise LabelsError(f"labels file {path}: column `{name}` is empty or invalid in rows {rows} (1-based, "
                              f"{int(bad.sum())} in all); `{LABEL}` must be 0 or 1, `{LABELLED_AT}` a time")
    return pl.DataFrame({ID: ids, LABEL: label, LABELLED_AT: at})


def _utc(column: pl.Series, path: Path) -> pl.Series:
    """Times as Datetime(us, UTC): ISO 8601 text with or without an offset (none: UTC), or a datetime column."""
    if column.dtype == pl.String:
        text = column.str.strip_chars().str.replace(" ", "T", literal=True).str.replace(r"Z$", "+00:00")
        aware = text.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%z", strict=False, time_unit="us", time_zone="UTC")
        naive = text.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="us")
        return pl.select(pl.coalesce(aware, naive.dt.replace_time_zone("UTC"))).to_series()
    if not isinstance(column.dtype, pl.Datetime):
        raise LabelsError(f"labels file {path}: `{LABELLED_AT}` has type {column.dtype}; give ISO 8601 times")
    column = column.dt.cast_time_unit("us")
    return column.dt.replace_time_zone("UTC") if column.dtype.time_zone is None else column.dt.convert_time_zone("UTC")


def latest_per_id(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per transaction: the latest `labelled_at` (rows later in `frame` win equal times)."""
    return (frame.with_row_index("_order").sort([LABELLED_AT, "_order"])
            .unique(ID, keep="last", maintain_order=False).drop("_order").sort(ID))


def ingest_labels(path: Path, labels_dir: Path, logged_ids: pl.Series) -> IngestResult:
    """Check `path`, keep each transaction's latest label and store them in `labels_dir`.

    `logged_ids`: the transaction ids of the model's logged predictions; labels of other ids are stored too (their
    prediction may be logged later, or by another model) and counted as unknown.
    """
    frame = load_labels_file(path)
    kept = latest_per_id(frame)
    known = kept[ID].is_in(logged_ids.cast(pl.String).implode())
    unknown = kept.filter(~known)[ID]
    labels_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    final = labels_dir / f"labels-{now}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        kept.write_parquet(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        raise LabelsError(f"cannot store labels in {labels_dir}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    result = IngestResult(str(path), frame.height, frame.height - kept.height, kept.height, unknown.len(),
                          tuple(unknown.head(5).to_list()), str(final))
    log.info("stored %d labels from %s in %s (%d duplicates dropped, %d ids not in the log)",
             result.stored, path, final, result.duplicates, result.unknown_ids)
    return result


def read_labels(labels_dir: Path) -> pl.DataFrame:
    """Every stored label, the latest per transaction; an empty frame (with the columns) when none is stored."""
    files = sorted(labels_dir.glob("labels-*.parquet")) if labels_dir.is_dir() else []
    if not files:
        return pl.DataFrame(schema=SCHEMA)
    frame = pl.concat([pl.read_parquet(f) for f in files])  # file names sort by ingest time
    return latest_per_id(frame)


def join_labels(predictions: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """`predictions` with `label` and `labelled_at` (null where no label arrived), joined on `transaction_id`."""
    return predictions.join(labels.select(COLUMNS), on=ID, how="left")
