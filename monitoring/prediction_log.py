"""Read the prediction log that the serving path writes over a time window, into one frame.

Layout: `<root>/model=<name>/version=<v>/date=YYYY-MM-DD/hour=HH/<segment>` (root: a local folder, or `s3://bucket/
prefix` where `treeops log ship` copies it: monitoring/log_store.py), where a segment is either
- `*.parquet`, written by the Python-backend models (backends/prediction_log.py): only complete segments have the
  final name; a `.tmp` file (a writer killed mid-segment), a Parquet file that fails to read (torn, truncated) or one
  of another schema is skipped with a warning naming it, never failing the read; or
- `*.tlog`, a journal appended by the native C backend (backends/treeops_forest.c documents the format, whose magic
  and version are defined here and compiled into it): a header naming the contract, model, version and features
  (and a raw-transaction model's raw fields), then records framed by length and CRC-32. A segment of another
  format, contract, model or version is skipped with a warning; a torn tail (power loss, a killed partial write)
  keeps the records before it, with a warning naming the file and the offset.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from backends.prediction_log import SCHEMA_KEY, SCHEMA_VERSION
from monitoring.log_store import LogStore

log = logging.getLogger(__name__)

#: The native backend's journal: its first 8 bytes and the format version after them (compiled into the backend by
#: export/native_backend.py).
JOURNAL_MAGIC = b"TREEOPSJ"
JOURNAL_FORMAT = 2
#: Formats this reader reads: 1 lacked the raw-transaction model's records (raw fields, degraded status 2).
READABLE_FORMATS = (1, JOURNAL_FORMAT)
JOURNAL_SUFFIX = ".tlog"
#: A segment not yet renamed that was written to this recently belongs to a live writer (which flushes every few
#: seconds at most), not a stopped one: skipped without a warning.
IN_PROGRESS_S = 60.0
_HEADER = struct.Struct("<8sIII")  # magic, format, JSON length, CRC-32 of the JSON
_FRAME = struct.Struct("<II")  # payload length, CRC-32 of the payload
_RECORD = struct.Struct("<qIHB")  # arrival us, rows (or error length), request id length, status (below)
_ANSWERED, _FAILED, _DEGRADED = 0, 1, 2
_U32 = struct.Struct("<I")
#: A raw field's kind in a journal header -> (its bytes per row, or 0 for length-prefixed text; its column type).
_RAW_KINDS = {"int64": (8, pl.Int64), "double": (8, pl.Float64), "string": (0, pl.Utf8)}

#: The columns every window has, whatever the model (then `feature.*` and `raw.*`).
FIXED_SCHEMA = {
    "request_id": pl.Utf8, "transaction_id": pl.Utf8, "entity": pl.Utf8,
    "arrival": pl.Datetime("us", "UTC"), "model": pl.Utf8, "version": pl.Int64, "degraded": pl.Boolean,
    "error": pl.Utf8, "score": pl.Float64,
}


def read_window(root: Path | str, model: str, start: dt.datetime, end: dt.datetime,
                version: int | None = None) -> pl.DataFrame:
    """Every logged row of `model` (one `version`, or all) that arrived in [start, end), in arrival order.

    `root`: a local folder or `s3://bucket/prefix` (monitoring/log_store.py: endpoint and credentials). `start`/`end`
    must be timezone-aware. The empty window is an empty frame with the fixed columns.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError(f"read_window({model!r}): start and end must be timezone-aware datetimes (e.g. UTC); "
                         f"got {start!r} and {end!r}")
    start, end = start.astimezone(dt.UTC), end.astimezone(dt.UTC)
    store = LogStore.open(root)
    frames = []
    for path in _segments(store, f"{store.path}/model={model}", start, end, version):
        frame = _read_segment(store, path)
        if frame is not None:
            frames.append(frame)
    if not frames:
        return pl.DataFrame(schema=FIXED_SCHEMA)
    frame = pl.concat(frames, how="diagonal_relaxed")
    return (frame.filter((pl.col("arrival") >= start) & (pl.col("arrival") < end))
            .sort("arrival", "request_id", maintain_order=True))


def logged_versions(root: Path | str, model: str) -> list[int]:
    """The versions of `model` with a `version=<v>` folder in the log, ascending."""
    store = LogStore.open(root)
    names = [i.base_name for i in store.list(f"{store.path}/model={model}") if _is_dir(i)]
    return sorted(int(n.removeprefix("version=")) for n in names if n.startswith("version=") and n[8:].isdigit())


def is_segment(name: str) -> bool:
    """A segment file's name (a complete Parquet segment or a journal), not a writer's `.tmp` or a dot file."""
    return name.endswith((".parquet", JOURNAL_SUFFIX)) and not name.startswith(".")


def whole_records(data: bytes) -> int:
    """The length of a journal's prefix that ends at a whole record (0 while its header is incomplete): what a
    copy of a journal being appended to may take without a torn tail."""
    if len(data) < _HEADER.size or len(data) < (offset := _HEADER.size + _HEADER.unpack_from(data)[2]):
        return 0
    while offset + _FRAME.size <= len(data) and (end := offset + _FRAME.size + _FRAME.unpack_from(data, offset)[0]) \
            <= len(data):
        offset = end
    return offset


def _is_dir(info: pafs.FileInfo) -> bool:
    return info.type == pafs.FileType.Directory


def _segments(store: LogStore, model_dir: str, start: dt.datetime, end: dt.datetime, version: int | None) -> list[str]:
    """The segment files of the hour partitions overlapping [start, end); other files are skipped, with a warning
    unless a writer touched them in the last `IN_PROGRESS_S` (a live server's segment being written)."""
    versions = [f"{model_dir}/version={version}"] if version is not None else [
        i.path for i in store.list(model_dir) if _is_dir(i) and i.base_name.startswith("version=")]
    first = start.replace(minute=0, second=0, microsecond=0)
    out = []
    for folder in versions:
        hour_dirs = [h for d in store.list(folder) if _is_dir(d) and d.base_name.startswith("date=")
                     for h in store.list(d.path) if _is_dir(h) and h.base_name.startswith("hour=")]
        for hour_dir in hour_dirs:
            date = PurePosixPath(hour_dir.path).parent.name
            try:
                hour = dt.datetime.strptime(f"{date} {hour_dir.base_name}", "date=%Y-%m-%d hour=%H")
            except ValueError:
                log.warning("prediction log: skipping %s, not a date=YYYY-MM-DD/hour=HH partition",
                            store.uri(hour_dir.path))
                continue
            hour = hour.replace(tzinfo=dt.UTC)
            if hour < first or hour >= end:
                continue
            for info in store.list(hour_dir.path):
                if is_segment(info.base_name):
                    out.append(info.path)
                elif info.mtime is not None and time.time() - info.mtime.timestamp() < IN_PROGRESS_S:
                    log.debug("prediction log: skipping %s, a segment a writer is still writing", store.uri(info.path))
                else:
                    log.warning("prediction log: skipping %s, an incomplete segment (a writer stopped before it "
                                "was renamed)", store.uri(info.path))
    return out


def _read_segment(store: LogStore, path: str) -> pl.DataFrame | None:
    """The segment as a frame, or None (with a warning naming it) when it is torn or of another schema."""
    name = store.uri(path)
    if path.endswith(JOURNAL_SUFFIX):
        return _read_journal(name, store.read_bytes(path))
    try:
        table = pq.read_table(path, filesystem=store.fs)
    except Exception as exc:  # pyarrow raises several types for torn files (ArrowInvalid, OSError, ...)
        log.warning("prediction log: skipping %s, not a readable Parquet file (torn or truncated: %s)", name, exc)
        return None
    found = (table.schema.metadata or {}).get(SCHEMA_KEY)
    missing = [c for c in FIXED_SCHEMA if c not in table.column_names]
    if found != SCHEMA_VERSION or missing:
        log.warning("prediction log: skipping %s, written with another schema (%s version %r, missing columns %s; "
                    "this reader reads version %r)", name, SCHEMA_KEY.decode(), found, missing, SCHEMA_VERSION)
        return None
    return pl.from_arrow(table)


def _read_journal(path: str, data: bytes) -> pl.DataFrame | None:
    """A native-backend journal (`path` names it, `data` its bytes) as a frame of the fixed columns and its `feature.*`
    columns; None (warned) when its header is unreadable or names another format, contract, model or version. A torn
    tail ends the read."""
    header = _journal_header(path, data)
    if header is None:
        return None
    layout, offset = header
    if layout.raw:
        return _read_raw_journal(path, data, offset, layout)
    names = layout.features
    width = len(names)
    chunks: list[_Chunk] = []
    records = 0
    while offset < len(data):
        run = _uniform_run(data, offset, width)  # the common case: many answered records of one shape
        if run is None:
            torn = _torn(data, offset, width)
            if torn:
                log.warning("prediction log: %s is torn at offset %d of %d (%s): kept the %d records before it, "
                            "skipped the rest", path, offset, len(data), torn, records)
                break
            run = _one_record(data, offset, width)
        chunk, offset = run
        chunks.append(chunk)
        records += len(chunk.arrivals)
    return _journal_frame(_partition(path), chunks, names)


@dataclass(frozen=True)
class _Layout:
    """A journal header's record layout: logged feature names, and a raw-transaction model's raw fields
    ((name, kind) in record order) and the names of its transaction id and entity fields."""

    features: list[str]
    raw: list[tuple[str, str]]
    transaction_id: str | None
    entity: str | None


@dataclass(frozen=True)
class _Chunk:
    """Consecutive records: per record arrival, request id, error (None: answered) and rows; per row score and
    features (zeros for a failed request's one row)."""

    arrivals: np.ndarray
    ids: np.ndarray
    errors: np.ndarray
    counts: np.ndarray
    scores: np.ndarray
    features: np.ndarray


def _one_record(data: bytes, offset: int, width: int) -> tuple[_Chunk, int]:
    """The whole record at `offset` (checked by `_torn`) and the offset after it."""
    length = _FRAME.unpack_from(data, offset)[0]
    start = offset + _FRAME.size
    arrival, count, id_len, status = _RECORD.unpack_from(data, start)
    body = start + _RECORD.size + id_len
    request_id = data[start + _RECORD.size:body].decode("utf-8", "replace")
    if status:
        error, rows = data[body:body + count].decode("utf-8", "replace"), 1
        scores, features = np.zeros(1, np.float32), np.zeros((1, width), np.float32)
    else:
        error, rows = None, count
        scores = np.frombuffer(data, "<f4", count, body)
        features = np.frombuffer(data, "<f4", count * width, body + 4 * count).reshape(count, width)
    chunk = _Chunk(np.array([arrival], np.int64), np.array([request_id], object), np.array([error], object),
                   np.array([rows], np.int64), scores, features)
    return chunk, start + length


def _uniform_run(data: bytes, offset: int, width: int) -> tuple[_Chunk, int] | None:
    """At least two whole answered records from `offset` with the first one's id length and rows (their CRC-32s
    checked), read at once; None where there are not."""
    if offset + _FRAME.size + _RECORD.size > len(data):
        return None
    length = _FRAME.unpack_from(data, offset)[0]
    _, count, id_len, status = _RECORD.unpack_from(data, offset + _FRAME.size)
    size = _FRAME.size + length
    if status or length != _RECORD.size + id_len + 4 * count * (1 + width) or (len(data) - offset) // size < 2:
        return None
    layout = np.dtype([("length", "<u4"), ("crc", "<u4"), ("arrival", "<i8"), ("count", "<u4"), ("id_len", "<u2"),
                       ("status", "u1"), ("id", f"S{id_len}"), ("score", "<f4", (count,)),
                       ("features", "<f4", (count, width))])
    records = np.frombuffer(data, layout, (len(data) - offset) // size, offset)
    same = (records["length"] == length) & (records["count"] == count) & (records["id_len"] == id_len) & (
        records["status"] == 0)
    n = len(records) if same.all() else int(np.argmin(same))
    view = memoryview(data)
    for i, crc in enumerate(records["crc"][:n].tolist()):
        at = offset + i * size + _FRAME.size
        if zlib.crc32(view[at:at + length]) != crc:
            n = i
            break
    if n < 2:
        return None
    run = records[:n]
    ids = np.array([i.decode("utf-8", "replace") for i in run["id"].tolist()], object)
    chunk = _Chunk(run["arrival"].astype(np.int64), ids, np.full(n, None, object), np.full(n, count, np.int64),
                   run["score"].reshape(-1), run["features"].reshape(-1, width))
    return chunk, offset + n * size


def _partition(path: str) -> tuple[str, int]:
    """(model, version) of a segment from its partition folders (model=<m>/version=<v>/date=/hour=/file)."""
    version_dir = PurePosixPath(path).parent.parent.parent
    return version_dir.parent.name.removeprefix("model="), int(version_dir.name.removeprefix("version="))


def _journal_header(path: str, data: bytes) -> tuple[_Layout, int] | None:
    """(record layout, offset of the first record), or None with a warning."""
    problem = None
    if len(data) < _HEADER.size:
        problem = f"{len(data)} bytes, shorter than a header (torn at creation)"
    else:
        magic, version, length, crc = _HEADER.unpack_from(data)
        text = data[_HEADER.size:_HEADER.size + length]
        if magic != JOURNAL_MAGIC or version not in READABLE_FORMATS:
            problem = (f"written with another schema (journal {magic!r} format {version}; this reader reads "
                       f"{JOURNAL_MAGIC!r} formats {READABLE_FORMATS})")
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
            elif any(r.get("kind") not in _RAW_KINDS for r in meta.get("raw", [])):
                problem = f"raw fields of unknown kinds {meta['raw']} (this reader reads {sorted(_RAW_KINDS)})"
            else:
                raw = [(r["name"], r["kind"]) for r in meta.get("raw", [])]
                layout = _Layout(list(meta["features"]), raw, meta.get("transaction_id"), meta.get("entity"))
                return layout, _HEADER.size + length
    log.warning("prediction log: skipping %s, %s", path, problem)
    return None


def _frame_problem(data: bytes | memoryview, offset: int) -> str | None:
    """Why the record frame at `offset` is not whole (partial, past the end, CRC-32 mismatch); None when it is."""
    if offset + _FRAME.size + _RECORD.size > len(data):
        return "a partial record frame"
    length, crc = _FRAME.unpack_from(data, offset)
    start = offset + _FRAME.size
    if start + length > len(data):
        return f"a record of {length} bytes runs past the end"
    if zlib.crc32(memoryview(data)[start:start + length]) != crc:
        return "a record's CRC-32 does not match"
    return None


def _torn(data: bytes, offset: int, width: int) -> str | None:
    """Why the record at `offset` is not whole (None when it is)."""
    if problem := _frame_problem(data, offset):
        return problem
    length = _FRAME.unpack_from(data, offset)[0]
    _, count, id_len, status = _RECORD.unpack_from(data, offset + _FRAME.size)
    body = count if status else 4 * count * (1 + width)
    if _RECORD.size + id_len + body != length:
        return "a record's fields do not add up to its length"
    return None


def _journal_frame(identity: tuple[str, int], chunks: list[_Chunk], names: list[str]) -> pl.DataFrame:
    """The journal's records as rows, with the Parquet segments' columns and types."""
    model, version = identity
    width = len(names)

    def joined(field: str, dtype: object) -> np.ndarray:
        parts = [getattr(c, field) for c in chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    counts, errors = joined("counts", np.int64), joined("errors", object)
    scores = joined("scores", np.float32)
    matrix = np.concatenate([c.features for c in chunks]) if chunks else np.zeros((0, width), np.float32)
    total = int(counts.sum())
    failed = np.repeat(np.array([e is not None for e in errors], bool), counts)
    columns = {
        "request_id": pl.Series(np.repeat(joined("ids", object), counts), dtype=pl.Utf8),
        "transaction_id": pl.Series([None] * total, dtype=pl.Utf8),
        "entity": pl.Series([None] * total, dtype=pl.Utf8),
        "arrival": pl.Series(np.repeat(joined("arrivals", np.int64), counts), dtype=pl.Int64)
        .cast(pl.Datetime("us", "UTC")),
        "model": pl.Series([model] * total, dtype=pl.Utf8),
        "version": pl.Series(np.full(total, version, np.int64)),
        "degraded": pl.Series(np.zeros(total, bool)),
        "error": pl.Series(np.repeat(errors, counts).tolist(), dtype=pl.Utf8),  # a None first: not an Object column
        "score": pl.Series(scores.astype(np.float64)),
    }
    frame = pl.DataFrame(columns)
    features = pl.DataFrame({f"feature.{n}": np.ascontiguousarray(matrix[:, j]) for j, n in enumerate(names)})
    if failed.any():  # a failed request's row has its error, no score and no features
        mask = pl.Series(failed)
        frame = frame.with_columns(pl.when(mask).then(None).otherwise(pl.col("score")).alias("score"))
        features = features.with_columns(pl.when(mask).then(None).otherwise(pl.col(c)).alias(c)
                                         for c in features.columns)
    return pl.concat([frame, features], how="horizontal") if width else frame


def _read_raw_journal(path: str, data: bytes, offset: int, layout: _Layout) -> pl.DataFrame:
    """A raw-transaction model's journal (records of varying length: its text fields) as a frame with the Parquet
    segments' columns: fixed, `feature.*` (history features) and `raw.*`; `transaction_id` and `entity` from the
    raw fields, as backends/online_model.py logs them. A torn tail ends the read, with a warning."""
    width, view = len(layout.features), memoryview(data)
    arrivals, ids, errors, counts, statuses, failed_txns = [], [], [], [], [], []
    scores, features = bytearray(), bytearray()
    raw: dict[str, bytearray | list] = {n: (bytearray() if _RAW_KINDS[k][0] else []) for n, k in layout.raw}
    while offset < len(data):
        record = _raw_record(view, offset, layout)
        if isinstance(record, str):
            log.warning("prediction log: %s is torn at offset %d of %d (%s): kept the %d records before it, "
                        "skipped the rest", path, offset, len(data), record, len(arrivals))
            break
        offset, (arrival, request_id, status, error, rows, parts, txns) = record
        arrivals.append(arrival)
        ids.append(request_id)
        errors.append(error)
        statuses.append(status)
        counts.append(rows)
        failed_txns.extend(txns)
        if status == _FAILED:
            scores += bytes(4 * rows)
            features += bytes(4 * rows * width)
            for name, kind in layout.raw:
                if _RAW_KINDS[kind][0]:
                    raw[name] += bytes(8 * rows)
                else:
                    raw[name].extend([None] * rows)
            continue
        scores += parts[0]
        features += parts[1]
        for (name, _), part in zip(layout.raw, parts[2:]):
            raw[name] += part
    chunk = _Chunk(np.array(arrivals, np.int64), np.array(ids, object), np.array(errors, object),
                   np.array(counts, np.int64), np.frombuffer(bytes(scores), "<f4"),
                   np.frombuffer(bytes(features), "<f4").reshape(-1, width))
    frame = _journal_frame(_partition(path), [chunk], layout.features)
    per_row = np.repeat(np.array(statuses, np.uint8), chunk.counts)
    mask = pl.Series(per_row == _FAILED)
    raw_columns = []
    for name, kind in layout.raw:
        size, dtype = _RAW_KINDS[kind]
        values = pl.Series(np.frombuffer(bytes(raw[name]), "<i8" if kind == "int64" else "<f8")) if size else \
            pl.Series(raw[name], dtype=pl.Utf8)
        raw_columns.append(pl.when(mask).then(None).otherwise(values.cast(dtype)).alias(f"raw.{name}"))
    frame = frame.with_columns(raw_columns)
    answered_txn = pl.col(f"raw.{layout.transaction_id}").cast(pl.Utf8)
    return frame.with_columns(
        pl.when(mask).then(pl.lit(pl.Series(failed_txns, dtype=pl.Utf8))).otherwise(answered_txn)
        .alias("transaction_id"),
        pl.when(mask).then(None).otherwise(pl.lit(f"{layout.entity}=") + pl.col(f"raw.{layout.entity}").cast(pl.Utf8))
        .alias("entity"),
        pl.Series("degraded", per_row == _DEGRADED),
    ).select(list(FIXED_SCHEMA) + [f"feature.{n}" for n in layout.features] + [f"raw.{n}" for n, _ in layout.raw])


def _raw_record(view: memoryview, offset: int, layout: _Layout) -> tuple[int, tuple] | str:
    """(offset after it, (arrival, request id, status, error, rows, answered parts, failed transaction ids)) of the
    raw-transaction record at `offset`, or why it is not whole. Answered parts: the bytes of its scores, its
    features and each raw field (text fields as a list of str)."""
    if problem := _frame_problem(view, offset):
        return problem
    start = offset + _FRAME.size
    end = start + _FRAME.unpack_from(view, offset)[0]
    arrival, count, id_len, status = _RECORD.unpack_from(view, start)
    at = start + _RECORD.size + id_len
    request_id = bytes(view[start + _RECORD.size:at]).decode("utf-8", "replace")
    try:
        if status == _FAILED:
            error = bytes(view[at:at + count]).decode("utf-8", "replace")
            (n,), at = _U32.unpack_from(view, at + count), at + count + 4
            txns = []
            for _ in range(n):
                (k,), at = _U32.unpack_from(view, at), at + 4
                txns.append(bytes(view[at:at + k]).decode("utf-8", "replace"))
                at += k
            record = (arrival, request_id, status, error, max(n, 1), (), txns or [None])
        else:
            rows, width = count, len(layout.features)
            parts = [view[at:at + 4 * rows], view[at + 4 * rows:at + 4 * rows * (1 + width)]]
            at += 4 * rows * (1 + width)
            for _, kind in layout.raw:
                if _RAW_KINDS[kind][0]:
                    parts.append(view[at:at + 8 * rows])
                    at += 8 * rows
                    continue
                lengths = struct.unpack_from(f"<{rows}I", view, at)
                at += 4 * rows
                texts = []
                for k in lengths:
                    texts.append(bytes(view[at:at + k]).decode("utf-8", "replace"))
                    at += k
                parts.append(texts)
            record = (arrival, request_id, status, None, rows, parts, [None] * rows)
    except struct.error:
        return "a record's fields do not add up to its length"
    if at != end:
        return "a record's fields do not add up to its length"
    return end, record
