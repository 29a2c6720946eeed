"""Read the prediction log that the serving path writes (backends/prediction_log.py) over a time window.

Layout: `<root>/model=<name>/version=<v>/date=YYYY-MM-DD/hour=HH/<segment>.parquet`. Only complete segments have
the final name; a `.tmp` file (a writer killed mid-segment), a Parquet file that fails to read (torn, truncated) or
one of another schema is skipped with a warning naming it, never failing the read.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from backends.prediction_log import SCHEMA_KEY, SCHEMA_VERSION

log = logging.getLogger(__name__)

#: The columns every window has, whatever the model (then `feature.*` and `raw.*`).
FIXED_SCHEMA = {
    "request_id": pl.Utf8, "transaction_id": pl.Utf8, "entity": pl.Utf8,
    "arrival": pl.Datetime("us", "UTC"), "model": pl.Utf8, "version": pl.Int64, "degraded": pl.Boolean,
    "error": pl.Utf8, "score": pl.Float64,
}


def read_window(root: Path | str, model: str, start: dt.datetime, end: dt.datetime,
                version: int | None = None) -> pl.DataFrame:
    """Every logged row of `model` (one `version`, or all) that arrived in [start, end), in arrival order.

    `start`/`end` must be timezone-aware. The empty window is an empty frame with the fixed columns.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError(f"read_window({model!r}): start and end must be timezone-aware datetimes (e.g. UTC); "
                         f"got {start!r} and {end!r}")
    start, end = start.astimezone(dt.UTC), end.astimezone(dt.UTC)
    frames = []
    for path in _segments(Path(root) / f"model={model}", start, end, version):
        frame = _read_segment(path)
        if frame is not None:
            frames.append(frame)
    if not frames:
        return pl.DataFrame(schema=FIXED_SCHEMA)
    frame = pl.concat(frames, how="diagonal_relaxed")
    return (frame.filter((pl.col("arrival") >= start) & (pl.col("arrival") < end))
            .sort("arrival", "request_id", maintain_order=True))


def _segments(model_dir: Path, start: dt.datetime, end: dt.datetime, version: int | None) -> list[Path]:
    """The segment files of the hour partitions overlapping [start, end); `.tmp` files are warned about."""
    if not model_dir.is_dir():
        return []
    versions = [model_dir / f"version={version}"] if version is not None else sorted(model_dir.glob("version=*"))
    first = start.replace(minute=0, second=0, microsecond=0)
    out = []
    for folder in versions:
        for hour_dir in sorted(folder.glob("date=*/hour=*")):
            try:
                hour = dt.datetime.strptime(f"{hour_dir.parent.name} {hour_dir.name}", "date=%Y-%m-%d hour=%H")
            except ValueError:
                log.warning("prediction log: skipping %s, not a date=YYYY-MM-DD/hour=HH partition", hour_dir)
                continue
            hour = hour.replace(tzinfo=dt.UTC)
            if hour < first or hour >= end:
                continue
            for path in sorted(hour_dir.iterdir()):
                if path.suffix == ".parquet" and not path.name.startswith("."):
                    out.append(path)
                else:
                    log.warning("prediction log: skipping %s, an incomplete segment (a writer stopped before it "
                                "was renamed)", path)
    return out


def _read_segment(path: Path) -> pl.DataFrame | None:
    """The segment as a frame, or None (with a warning naming it) when it is torn or of another schema."""
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for torn files (ArrowInvalid, OSError, ...)
        log.warning("prediction log: skipping %s, not a readable Parquet file (torn or truncated: %s)", path, exc)
        return None
    found = (table.schema.metadata or {}).get(SCHEMA_KEY)
    missing = [c for c in FIXED_SCHEMA if c not in table.column_names]
    if found != SCHEMA_VERSION or missing:
        log.warning("prediction log: skipping %s, written with another schema (%s version %r, missing columns %s; "
                    "this reader reads version %r)", path, SCHEMA_KEY.decode(), found, missing, SCHEMA_VERSION)
        return None
    return pl.from_arrow(table)
