"""Read the prediction log that the serving path writes over a time window, into one frame.

Layout: `<root>/model=<name>/version=<v>/date=YYYY-MM-DD/hour=HH/<segment>`, where a segment is either
- `*.parquet`, written by the Python-backend models (backends/prediction_log.py): only complete segments have the
  final name; a `.tmp` file (a writer killed mid-segment), a Parquet file that fails to read (torn, truncated) or one
  of another schema is skipped with a warning naming it, never failing the read; or
- `*.tlog`, a journal appended by the native C backend (backends/treeops_forest.c documents the format, whose magic
  and version are defined here and compiled into it): a header naming the contract, model, version and features,
  then records framed by length and CRC-32. A segment of another format, contract, model or version is skipped
  with a warning; a torn tail (power loss, a killed partial write) keeps the records before it, with a warning
  naming the file and the offset.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from backends.prediction_log import SCHEMA_KEY, SCHEMA_VERSION

log = logging.getLogger(__name__)

#: The native backend's journal: its first 8 bytes and the format version after them (compiled into the backend by
#: export/native_backend.py).
JOURNAL_MAGIC = b"TREEOPSJ"
JOURNAL_FORMAT = 1
JOURNAL_SUFFIX = ".tlog"
_HEADER = struct.Struct("<8sIII")  # magic, format, JSON length, CRC-32 of the JSON
_FRAME = struct.Struct("<II")  # payload length, CRC-32 of the payload
_RECORD = struct.Struct("<qIHB")  # arrival us, rows (or error length), request id length, status (1 = failed)

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
                if path.suffix in (".parquet", JOURNAL_SUFFIX) and not path.name.startswith("."):
                    out.append(path)
                else:
                    log.warning("prediction log: skipping %s, an incomplete segment (a writer stopped before it "
                                "was renamed)", path)
    return out


def _read_segment(path: Path) -> pl.DataFrame | None:
    """The segment as a frame, or None (with a warning naming it) when it is torn or of another schema."""
    if path.suffix == JOURNAL_SUFFIX:
        return _read_journal(path)
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


def _read_journal(path: Path) -> pl.DataFrame | None:
    """A native-backend journal as a frame of the fixed columns and its `feature.*` columns; None (warned) when its
    header is unreadable or names another format, contract, model or version. A torn tail ends the read."""
    data = path.read_bytes()
    header = _journal_header(path, data)
    if header is None:
        return None
    names, offset = header
    width = len(names)
    arrivals, ids, errors, row_counts, scores, features = [], [], [], [], [], []
    while offset < len(data):
        torn = _torn(data, offset, width)
        if torn:
            log.warning("prediction log: %s is torn at offset %d of %d (%s): kept the %d records before it, "
                        "skipped the rest", path, offset, len(data), torn, len(arrivals))
            break
        length = _FRAME.unpack_from(data, offset)[0]
        start = offset + _FRAME.size
        arrival, count, id_len, status = _RECORD.unpack_from(data, start)
        body = start + _RECORD.size + id_len
        arrivals.append(arrival)
        ids.append(data[start + _RECORD.size:body].decode("utf-8", "replace"))
        if status:
            errors.append(data[body:body + count].decode("utf-8", "replace"))
            row_counts.append(1)
            scores.append(None)
            features.append(None)
        else:
            errors.append(None)
            row_counts.append(count)
            scores.append(data[body:body + 4 * count])
            features.append(data[body + 4 * count:body + 4 * count * (1 + width)])
        offset = start + length
    return _journal_frame(path, _partition(path), arrivals, ids, errors, row_counts, scores, features, names)


def _partition(path: Path) -> tuple[str, int]:
    """(model, version) of a segment from its partition folders (model=<m>/version=<v>/date=/hour=/file)."""
    version_dir = path.parent.parent.parent
    return version_dir.parent.name.removeprefix("model="), int(version_dir.name.removeprefix("version="))


def _journal_header(path: Path, data: bytes) -> tuple[list[str], int] | None:
    """(feature names, offset of the first record), or None with a warning."""
    problem = None
    if len(data) < _HEADER.size:
        problem = f"{len(data)} bytes, shorter than a header (torn at creation)"
    else:
        magic, version, length, crc = _HEADER.unpack_from(data)
        text = data[_HEADER.size:_HEADER.size + length]
        if magic != JOURNAL_MAGIC or version != JOURNAL_FORMAT:
            problem = (f"written with another schema (journal {magic!r} format {version}; this reader reads "
                       f"{JOURNAL_MAGIC!r} format {JOURNAL_FORMAT})")
        elif len(text) < length or zlib.crc32(text) != crc:
            problem = "a torn header (its CRC-32 does not match)"
        else:
            meta = json.loads(text)
            model, version = _partition(path)
            if meta.get("contract") != SCHEMA_VERSION.decode():
                problem = (f"written with another schema ({SCHEMA_KEY.decode()} version {meta.get('contract')!r}; "
                           f"this reader reads version {SCHEMA_VERSION!r})")
            elif (meta.get("model"), meta.get("version")) != (model, version):
                problem = (f"written for model {meta.get('model')!r} version {meta.get('version')}, another model "
                           f"version than its folder's ({model!r} version {version})")
            else:
                return list(meta["features"]), _HEADER.size + length
    log.warning("prediction log: skipping %s, %s", path, problem)
    return None


def _torn(data: bytes, offset: int, width: int) -> str | None:
    """Why the record at `offset` is not whole (None when it is)."""
    if offset + _FRAME.size + _RECORD.size > len(data):
        return "a partial record frame"
    length, crc = _FRAME.unpack_from(data, offset)
    start = offset + _FRAME.size
    if start + length > len(data):
        return f"a record of {length} bytes runs past the end"
    if zlib.crc32(memoryview(data)[start:start + length]) != crc:
        return "a record's CRC-32 does not match"
    _, count, id_len, status = _RECORD.unpack_from(data, start)
    body = count if status else 4 * count * (1 + width)
    if _RECORD.size + id_len + body != length:
        return "a record's fields do not add up to its length"
    return None


def _journal_frame(path: Path, identity: tuple[str, int], arrivals: list[int], ids: list[str],
                   errors: list[str | None], row_counts: list[int], scores: list[bytes | None],
                   features: list[bytes | None], names: list[str]) -> pl.DataFrame:
    """The journal's records as rows, with the Parquet segments' columns and types."""
    model, version = identity
    counts = np.asarray(row_counts, np.int64)
    total = int(counts.sum())
    failed = np.repeat(np.array([e is not None for e in errors], bool), counts)
    width = len(names)
    score = np.zeros(total, np.float32)
    matrix = np.zeros((total, width), np.float32)
    row = 0
    for n, s, f in zip(row_counts, scores, features):
        if s is not None:
            score[row:row + n] = np.frombuffer(s, "<f4")
            matrix[row:row + n] = np.frombuffer(f, "<f4").reshape(n, width)
        row += n
    columns = {
        "request_id": pl.Series(np.repeat(np.array(ids, object), counts), dtype=pl.Utf8),
        "transaction_id": pl.Series([None] * total, dtype=pl.Utf8),
        "entity": pl.Series([None] * total, dtype=pl.Utf8),
        "arrival": pl.Series(np.repeat(np.asarray(arrivals, np.int64), counts), dtype=pl.Int64)
        .cast(pl.Datetime("us", "UTC")),
        "model": pl.Series([model] * total, dtype=pl.Utf8),
        "version": pl.Series(np.full(total, version, np.int64)),
        "degraded": pl.Series(np.zeros(total, bool)),
        "error": pl.Series(np.repeat(np.array(errors, object), counts), dtype=pl.Utf8),
        "score": pl.Series(score.astype(np.float64)),
    }
    frame = pl.DataFrame(columns)
    if failed.any():
        frame = frame.with_columns(pl.when(pl.Series(failed)).then(None).otherwise(pl.col("score")).alias("score"))
    features_frame = pl.DataFrame({f"feature.{n}": matrix[:, j] for j, n in enumerate(names)})
    if failed.any():
        features_frame = features_frame.with_columns(
            pl.when(pl.Series(failed)).then(None).otherwise(pl.col(c)).alias(c) for c in features_frame.columns)
    return pl.concat([frame, features_frame], how="horizontal") if width else frame
