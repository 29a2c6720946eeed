"""The server-side prediction log: a bounded ring on the request path, a background writer of Parquet segments.

Copied beside `model.py` into Python-backend version folders (export/targets/python_runtime.py); runs in Triton's
stub process and imports nothing from treeops (numpy, pyarrow only). The layout and columns are the contract that
monitoring/prediction_log.py reads:

    <root>/model=<name>/version=<v>/date=YYYY-MM-DD/hour=HH/<segment>.parquet

- `append` (request path) is O(1) and never blocks: one deque append; when the ring holds `ring_size` requests the
  record is dropped and counted (`dropped`; serving_monitor.py publishes it as treeops_prediction_log_dropped_total).

- The writer thread flushes at least every `flush_interval_s` (and as soon as `flush_rows` rows wait): one segment
  per hour partition, written to a `.tmp` name, fsynced (not in a stop's flush, see `flush`), then renamed, so a
  complete segment is the only thing with the final name. Past `max_bytes` the model's oldest segments (all versions) are deleted.
- `close` (model finalize: Triton unload) flushes everything. On kill -9 the records of the last flush interval
  (about 1 s) are lost and at most a `.tmp` file is left, which readers skip.
- Graceful stop (server/launcher.py): the launcher kills tritonserver's process group as Triton starts unloading its
  models (so clients see UNAVAILABLE, not NOT_FOUND), so finalize never runs; `StopHandshake` makes it lossless.
  Files under `<root>/.flush/`, `<server>` being tritonserver's pid (the stub's process group): each log registers
  `<server>-<pid>-<n>.writer`. Before SIGTERM the launcher writes `<server>.stop`: the stub's metrics publisher
  (serving_monitor.py, every 0.5 s) stops calling Triton (a call waiting on a frozen Triton would hold the GIL and
  wedge the stub), has the writer poll every `POLL_S`, and answers `.quiet`. Once Triton logged that it unloads (no
  request executes any more) the launcher freezes it and writes `<server>.flush`; the writer writes everything
  queued and answers `.flushed`. `quiet_all` and `flush_all` are the launcher's side.
- Sampling keeps a request when crc32(request id) / 2**32 < `sample_rate`, so a retry (same id) gets the same
  decision.
- `lag_s`: seconds since the oldest record not yet written (0 when none waits): treeops_prediction_log_lag_seconds.
"""

import collections
import datetime as dt
import itertools
import logging
import os
import threading
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DIR_ENV = "TREEOPS_PREDICTION_LOG_DIR"
SAMPLE_RATE_ENV = "TREEOPS_PREDICTION_LOG_SAMPLE_RATE"
MAX_BYTES_ENV = "TREEOPS_PREDICTION_LOG_MAX_BYTES"
RING_SIZE_ENV = "TREEOPS_PREDICTION_LOG_RING_SIZE"
FLUSH_INTERVAL_ENV = "TREEOPS_PREDICTION_LOG_FLUSH_INTERVAL_S"
#: Schema metadata key naming the contract a segment follows; the reader skips segments of another one.
SCHEMA_KEY = b"treeops.prediction_log"
SCHEMA_VERSION = b"1"
HOUR_US = 3_600_000_000
#: Folder under the log root of the stop handshake's files; how often a stopping writer looks for the flush request.
FLUSH_DIR = ".flush"
POLL_S = 0.01

log = logging.getLogger(__name__)


class Settings:
    """The log's settings from tritonserver's environment (server/settings.py TritonSettings sets them)."""

    def __init__(self, environ=os.environ):
        self.root = environ.get(DIR_ENV) or None
        self.sample_rate = _number(environ, SAMPLE_RATE_ENV, "1.0", float, 0.0, 1.0)
        self.max_bytes = _number(environ, MAX_BYTES_ENV, str(10 * 2**30), int, 1, None)
        self.ring_size = _number(environ, RING_SIZE_ENV, "100000", int, 1, None)
        self.flush_interval_s = _number(environ, FLUSH_INTERVAL_ENV, "1.0", float, 0.01, 60.0)


def _number(environ, key, default, kind, low, high):
    text = environ.get(key, default)
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{key}={text!r} in tritonserver's environment is not a {kind.__name__} in {bounds}: "
                         "fix the TritonSettings prediction_log_* field (or the variable)")
    return value


def sampled(request_id, rate):
    """Whether a request of this id is logged at `rate` (the same answer for every retry of it)."""
    if rate >= 1.0:
        return True
    return zlib.crc32(request_id.encode("utf-8")) < rate * 4294967296.0


def fixed_fields():
    """The columns every segment has, before its `feature.*` and `raw.*` columns."""
    return [
        pa.field("request_id", pa.string()), pa.field("transaction_id", pa.string()),
        pa.field("entity", pa.string()), pa.field("arrival", pa.timestamp("us", tz="UTC")),
        pa.field("model", pa.string()), pa.field("version", pa.int64()), pa.field("degraded", pa.bool_()),
        pa.field("error", pa.string()), pa.field("score", pa.float64()),
    ]


class PredictionLog:
    """One model version's log. `append` from `execute`; `close` from `finalize`.

    `features`: served feature names (`feature.<name>` Float32 columns, in order); `raw`: (field, arrow type) of
    the raw inputs (`raw.<field>` columns).
    """

    def __init__(self, settings, model, version, features, raw=(), flush_rows=50_000):
        self.settings, self.model, self.version = settings, model, int(version)
        self.features, self.raw = list(features), list(raw)
        self.schema = pa.schema(
            fixed_fields() + [pa.field(f"feature.{n}", pa.float32()) for n in self.features]
            + [pa.field(f"raw.{n}", t) for n, t in self.raw],
            metadata={SCHEMA_KEY: SCHEMA_VERSION})
        self.model_dir = os.path.join(settings.root, f"model={model}")
        self.folder = os.path.join(self.model_dir, f"version={self.version}")
        self.dropped = 0
        self.written_rows = 0
        self._ring = collections.deque()
        self._rows_waiting = 0  # written by `append` only; approximate in the writer (a trigger, not a count)
        self._oldest_in_flight = None
        self._flush_rows = flush_rows
        self._sequence = 0
        self._wake = threading.Event()
        self._stop = False
        self._table([])  # pyarrow imports pandas on its first object array (~0.4 s): at load, not in a flush
        self.handshake = StopHandshake(settings.root)
        self._thread = threading.Thread(target=self._run, name=f"prediction-log-{model}-{version}", daemon=True)
        self._thread.start()

    # --- request path ---------------------------------------------------------------------------------------

    def append(self, request_id, arrival_us, score=None, features=None, raw=None, transaction_id=None, entity=None,
               degraded=False, error=None):
        """Queue one request's rows; False (and counted) when the ring is full. Never blocks.

        `score` (rows,) float; `features` (rows, n_features); `raw` {field: (rows,)}; `transaction_id`/`entity`
        (rows,) or None; `error`: the failure message (then no score, features or raw are kept; one row per
        transaction id given, else one row).
        """
        if len(self._ring) >= self.settings.ring_size:
            self.dropped += 1
            return False
        record = (request_id, arrival_us, score, features, raw, transaction_id, entity, degraded, error)
        self._ring.append(record)
        self._rows_waiting += _rows(record)
        if self._rows_waiting >= self._flush_rows:
            self._wake.set()
        return True

    def lag_s(self, now_us=None):
        """Seconds since the oldest record not yet in a complete segment (0 when none waits)."""
        oldest = self._oldest_in_flight
        if oldest is None and self._ring:
            try:
                oldest = self._ring[0][1]
            except IndexError:
                oldest = None
        if oldest is None:
            return 0.0
        return max(0.0, ((now_us or time.time_ns() // 1000) - oldest) / 1e6)

    # --- writer thread --------------------------------------------------------------------------------------

    def _run(self):
        interval = self.settings.flush_interval_s
        due = time.monotonic() + interval
        while True:
            handshake = self.handshake
            timeout = max(0.0, due - time.monotonic())
            woken = self._wake.wait(min(timeout, POLL_S) if handshake.stopping else timeout)
            stop = self._stop
            asked = handshake.flush_requested()
            if not (woken or stop or asked or time.monotonic() >= due):
                continue
            self._wake.clear()
            due = time.monotonic() + interval
            try:
                self.flush(durable=not asked)
            except Exception:  # a full disk must not kill the writer: keep the records' count honest and go on
                log.exception("prediction log of %s version %s: writing a segment under %s failed",
                              self.model, self.version, self.folder)
            if asked:
                handshake.answer("flushed")
            if stop:
                handshake.unregister()
                return

    def prepare_stop(self):
        """The server is about to stop (the publisher saw `<server>.stop`): look for the flush request every POLL_S."""
        self.handshake.stopping = True
        self._wake.set()

    def flush(self, durable=True):
        """Write every queued record (writer thread, or the caller after `close` stopped it).

        `durable`: fsync each segment and its folder (survives a machine crash). The stop's flush skips it: written
        data outlives the killed process in the page cache, and an fsync on a busy disk can take seconds while
        tritonserver is frozen.
        """
        entries = []
        ring = self._ring
        if ring:
            self._oldest_in_flight = ring[0][1]
        for _ in range(len(ring)):
            entries.append(ring.popleft())
        self._rows_waiting = 0
        try:
            by_hour = collections.defaultdict(list)
            for e in entries:
                by_hour[e[1] // HOUR_US].append(e)
            for hour, part in sorted(by_hour.items()):
                self._write(hour, part, durable)
        finally:
            self._oldest_in_flight = None
        if entries:
            self._retain()

    def _write(self, hour, entries, durable):
        table = self._table(entries)
        start = dt.datetime.fromtimestamp(hour * 3600, dt.UTC)
        folder = os.path.join(self.folder, f"date={start:%Y-%m-%d}", f"hour={start:%H}")
        os.makedirs(folder, exist_ok=True)
        self._sequence += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._sequence:06d}.parquet"
        final = os.path.join(folder, name)
        temp = os.path.join(folder, f".{name}.tmp")
        with open(temp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.rename(temp, final)
        if durable:
            directory = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        self.written_rows += table.num_rows

    def _table(self, entries):
        """One Arrow table of `entries`; a failed request is one row with its error and no features."""
        counts = [_rows(e) for e in entries]
        total = sum(counts)
        repeat = np.repeat

        def per_row(i, dtype):
            return repeat(np.array([e[i] for e in entries], dtype=dtype), counts)

        def optional(i, kind):
            parts = [np.full(n, None, object) if e[i] is None else np.asarray(e[i]).reshape(-1).astype(str).astype(object)
                     for e, n in zip(entries, counts)]
            return pa.array(np.concatenate(parts), kind) if parts else pa.array([], kind)

        columns = {
            "request_id": pa.array(per_row(0, object), pa.string()),
            "transaction_id": optional(5, pa.string()) if any(e[5] is not None for e in entries)
            else pa.nulls(total, pa.string()),
            "entity": optional(6, pa.string()) if any(e[6] is not None for e in entries)
            else pa.nulls(total, pa.string()),
            "arrival": pa.array(per_row(1, np.int64), pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "model": pa.array(np.full(total, self.model, object), pa.string()),
            "version": pa.array(np.full(total, self.version, np.int64)),
            "degraded": pa.array(per_row(7, np.bool_)),
            "error": pa.array(per_row(8, object), pa.string()),
        }
        ok = [e[8] is None for e in entries]
        columns["score"] = _masked(entries, counts, ok, lambda e: np.asarray(e[2], np.float64).reshape(-1),
                                   pa.float64())
        if self.features:
            matrix, failed = _stack(entries, counts, ok, len(self.features))
            for j, name in enumerate(self.features):
                columns[f"feature.{name}"] = pa.array(np.ascontiguousarray(matrix[:, j]), pa.float32(), mask=failed)
        for name, kind in self.raw:
            columns[f"raw.{name}"] = _masked(entries, counts, ok, lambda e, n=name: e[4][n], kind)
        return pa.table(columns, schema=self.schema)

    def _retain(self):
        """Delete the model's oldest complete segments (every version, the native backend's `.tlog` journals
        included: the names of both start with their creation time) while they hold more than max_bytes."""
        segments = []
        for folder, _, files in os.walk(self.model_dir):
            for f in files:
                if f.endswith((".parquet", ".tlog")):
                    path = os.path.join(folder, f)
                    try:
                        segments.append((f, path, os.path.getsize(path)))
                    except OSError:  # deleted meanwhile by another instance's retention
                        continue
        total = sum(s[2] for s in segments)
        for _, path, size in sorted(segments):
            if total <= self.settings.max_bytes:
                break
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            total -= size

    def close(self, timeout_s=30.0):
        """Stop the writer after it flushed everything queued (model finalize)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("prediction log of %s version %s: the writer did not finish within %ss; %d requests unwritten",
                      self.model, self.version, timeout_s, len(self._ring))


class StopHandshake:
    """One log's side of the graceful-stop handshake (module docstring): registered while its writer runs."""

    _count = itertools.count()

    def __init__(self, root):
        server = os.getpgid(0)
        self.folder = os.path.join(root, FLUSH_DIR)
        os.makedirs(self.folder, exist_ok=True)
        self.stem = os.path.join(self.folder, f"{server}-{os.getpid()}-{next(self._count)}")
        self.requests = os.path.join(self.folder, f"{server}")
        self.stopping = False
        self._flushed = False
        with open(self.stem + ".writer", "wb"):
            pass

    def stop_requested(self):
        return os.path.exists(self.requests + ".stop")

    def flush_requested(self):
        return not self._flushed and os.path.exists(self.requests + ".flush")

    def answer(self, what):
        """`quiet` (no more calls to Triton) or `flushed` (everything queued when asked is written, or its failure
        logged)."""
        with open(f"{self.stem}.{what}", "wb"):
            pass
        self._flushed = self._flushed or what == "flushed"

    def unregister(self):
        for suffix in (".writer", ".quiet", ".flushed"):
            try:
                os.remove(self.stem + suffix)
            except FileNotFoundError:
                pass


def quiet_all(root, server_pid, timeout_s):
    """Before SIGTERM: ask the stubs of tritonserver `server_pid` to stop calling Triton; wait for each (at most
    `timeout_s`). Returns the registrations that did not answer."""
    return _ask(root, server_pid, "stop", "quiet", timeout_s)


def flush_all(root, server_pid, timeout_s):
    """Once no request executes any more: ask every log of tritonserver `server_pid` to write what it queued; wait
    until each answered, finished (finalize) or died, at most `timeout_s`. Returns the registrations that did not."""
    return _ask(root, server_pid, "flush", "flushed", timeout_s)


def _ask(root, server_pid, request, answer, timeout_s):
    folder = os.path.join(root, FLUSH_DIR)
    prefix = f"{server_pid}-"
    try:
        stems = [os.path.join(folder, f[: -len(".writer")]) for f in os.listdir(folder)
                 if f.startswith(prefix) and f.endswith(".writer")]
    except FileNotFoundError:
        return []
    with open(os.path.join(folder, f"{server_pid}.{request}"), "wb"):
        pass
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = [s for s in stems if os.path.exists(s + ".writer") and not os.path.exists(f"{s}.{answer}")
                   and _alive(int(os.path.basename(s).split("-")[1]))]
        if not waiting or time.monotonic() >= deadline:
            return [s + ".writer" for s in waiting]
        time.sleep(POLL_S / 4)


def clear_handshakes(root):
    """Remove the handshake files of servers that no longer run (a stopped or killed tritonserver's)."""
    folder = os.path.join(root, FLUSH_DIR)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        server = name.split("-")[0].split(".")[0]
        if server.isdigit() and not _alive(int(server)):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def _alive(pid):
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, IndexError):
        return False


def _rows(entry):
    """Rows of a queued request: its scores, or for a failed one its transaction ids (else one row)."""
    if entry[2] is not None:
        return len(entry[2])
    return 1 if entry[5] is None else len(entry[5])


def _masked(entries, counts, ok, values, kind):
    """One column over every row: the entry's values where it succeeded, nulls for failed requests' rows."""
    if not entries:
        return pa.array([], kind)
    if all(ok):
        return pa.array(np.concatenate([np.asarray(values(e)).reshape(-1) for e in entries]), kind)
    data = np.concatenate([np.asarray(values(e)).reshape(-1).astype(object) if good else np.full(n, None, object)
                           for e, n, good in zip(entries, counts, ok)])
    return pa.array(data, kind)


def _stack(entries, counts, ok, width):
    """(rows, width) float32 features of every row, and which rows failed (None: none did)."""
    if not entries:
        return np.zeros((0, width), np.float32), None
    if all(ok):
        return np.concatenate([np.asarray(e[3], np.float32).reshape(n, width) for e, n in zip(entries, counts)]), None
    data = np.concatenate([np.asarray(e[3], np.float32).reshape(n, width) if good else np.zeros((n, width), np.float32)
                           for e, n, good in zip(entries, counts, ok)])
    return data, np.repeat(~np.array(ok), counts)
