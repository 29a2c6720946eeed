"""Triton Python-backend model scoring raw transactions: history features from the online store, then the trees.

Copied as `model.py` into a raw-transaction version folder (export/online.py), with `online_history.py`
and `version_files.py` beside it; runs in Triton's stub process and imports nothing from treeops.

Inputs are the raw fields named in the config (dims [1], requests [N, 1]): BYTES strings, INT64
integers and Datetime fields as epoch microseconds UTC, FP64 numbers. Each dynamic batch (one `execute`) is
handled as one table, not request by request:

1. Each request's input tensors are taken and its shape checked (every input has the request's rows); the
   valid ones are concatenated per field and checked at once, each failing row charged to its request: a
   string that is not UTF-8, a negative or non-finite value of a `non_negative_fields` field (amounts), a time
   outside 1990-01-01..2200-01-01 UTC (it catches seconds or milliseconds sent as microseconds). A failing
   request alone gets INVALID_ARG naming the field and its row, and is dropped from the table before the
   store is called: nothing of it reaches the store, the others are answered. (Triton itself refuses a missing
   input or a wrong datatype, naming it.)
2. One `OnlineHistory.features` call reads and updates the history of every row of the table: one Redis round
   trip, one Lua script call (rows of one entity applied in (time, row) order, each seeing the ones before it,
   across requests too; a transaction_id already seen gets the same features and changes nothing). Rows of
   requests with the parameter `treeops_read_only` true are flagged not to update: they read, in that same
   order, and change no state (re-scoring, shadow traffic).
3. One ONNX Runtime run scores the table's raw fields plus the history features (`model.onnx`, the raw graph);
   then one response per request, its rows' slice: `probabilities` and `treeops_degraded` (BOOL per row).

The store (env `TREEOPS_ONLINE_STORE_URL`, set by the launcher) is connected on first use, so a store
down at load does not fail the load. When it is unreachable, config parameter `on_store_unavailable`
decides: "error" fails the requests with UNAVAILABLE naming the store URL (a retry is safe: rows
already written are recognised by transaction_id); "score_without_history" scores with the history
features missing (NaN), sets `treeops_degraded` and counts the answer in the Triton metric
`treeops_degraded_answers_total{model,version}` (metrics port). The flag is an output tensor, not a
response parameter: tritonserver 2.51's Python backend cannot set those (`InferenceResponse` takes only
`output_tensors` and `error`; `parameters=` raises TypeError, and libtriton_python.so calls no
`TRITONBACKEND_ResponseSet*Parameter`). Config parameter `treeops_degraded_output` describes it.

Every request is counted in the serving metrics (serving_monitor.py) and, with the prediction log on (env
TREEOPS_PREDICTION_LOG_DIR), logged with its raw fields, the history features computed here (the stateless ones
are computed inside the graph), transaction_id, entity, score and degraded flag; a refused or failed request with
its error instead (and its transaction ids when they were decoded).
"""

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils
from online_history import OnlineHistory, StoreUnavailable, connect, late_us_of, redacted
from serving_monitor import ServingMonitor
from version_files import verify_files

URL_ENV = "TREEOPS_ONLINE_STORE_URL"
TIMEOUT_ENV = "TREEOPS_ONLINE_STORE_TIMEOUT_S"
RETRIES_ENV = "TREEOPS_ONLINE_STORE_RETRIES"
READ_ONLY_PARAMETER = "treeops_read_only"
DEGRADED_OUTPUT = "treeops_degraded"
POLICIES = ("error", "score_without_history")
MIN_TIME_US = 631_152_000_000_000  # 1990-01-01T00:00:00Z
MAX_TIME_US = 7_258_118_400_000_000  # 2200-01-01T00:00:00Z
_KINDS = {"TYPE_STRING": "string", "TYPE_INT64": "int64", "TYPE_FP64": "double"}
_ARROW = {"string": "string", "int64": "int64", "double": "float64"}


class RequestError(Exception):
    """A request the model refuses (INVALID_ARG); its message names the field and the row."""


class TritonPythonModel:
    """Python-backend entry points: `initialize`, `execute`, `finalize`."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        verify_files(folder)
        self.label = f"model {args['model_name']!r} version {args['model_version']}"
        self.fields = []
        for i in config["input"]:
            if i["data_type"] not in _KINDS:
                raise ValueError(f"input {i['name']!r} has type {i['data_type']}; the raw-transaction model takes "
                                 f"{sorted(_KINDS)}: re-export the version")
            self.fields.append((i["name"], _KINDS[i["data_type"]]))
        self.output = config["output"][0]["name"]
        self.policy = params.get("on_store_unavailable", "error")
        if self.policy not in POLICIES:
            raise ValueError(f"config parameter on_store_unavailable is {self.policy!r}; use one of {POLICIES}")
        self.non_negative = [f for f in params.get("non_negative_fields", "").split(",") if f]
        self.transaction_id = params["transaction_id_field"]
        with open(os.path.join(folder, "feature_spec.json"), encoding="utf-8") as f:
            fitted = json.load(f)
        features = fitted["features"]
        history = [f["history"] for f in features if f.get("history")]
        self.entity, self.time = history[0]["entity"], history[0]["time"]
        self.values = sorted({h["value"] for h in history if h["value"]})
        self.session = self._session(folder)
        self.graph_inputs = [i.name for i in self.session.get_inputs()]
        self.history = self._history(params["store_namespace"], features, late_us_of(fitted))
        self.names = list(self.history.names)
        self.history_column = {name: k for k, name in enumerate(self.names)}  # graph input -> history column
        import pyarrow as pa

        self.monitor = ServingMonitor(pb_utils, args, config, params, folder, self.names,
                                      [(n, getattr(pa, _ARROW[k])()) for n, k in self.fields])

    @staticmethod
    def _session(folder):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a row's bits never depend on what it is batched with
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return ort.InferenceSession(os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"])

    def _history(self, namespace, features, late_us):
        """The store client; redis-py connects on the first command, so a store down now fails no load.
        `late_us`: the spec's late allowance stored with the fitted features (1 day in JSON that predates it)."""
        url = os.environ.get(URL_ENV)
        if not url:
            raise ValueError(f"{URL_ENV} is not set in tritonserver's environment: this raw-transaction model "
                             "reads its history features from Redis; `treeops serve` sets it (or starts a local "
                             "redis-server), else export the URL before starting tritonserver")
        client = connect(url, timeout_s=float(os.environ.get(TIMEOUT_ENV, "1.0")),
                         retries=int(os.environ.get(RETRIES_ENV, "1")))
        self.url = redacted(url)
        return OnlineHistory(client, self.url, namespace, features, late_us=late_us)

    # --- per batch -------------------------------------------------------------------------------

    def execute(self, requests):
        self._started, self._arrival = time.perf_counter_ns(), time.time_ns() // 1000
        self._ids = [self.monitor.request_id(r) for r in requests]
        responses = [None] * len(requests)
        table = self._decode(requests, responses)
        if table is not None:
            self._score(table, responses)
        return responses

    def _refuse(self, k, exc, responses):
        message = f"{self.label}: {exc}; nothing was written to the online store"
        responses[k] = self._error(message, pb_utils.TritonError.INVALID_ARG)
        self._log_error(k, message, None)

    def _log_error(self, k, message, columns):
        if self.monitor.should_log(self._ids[k]):
            self.monitor.log.append(self._ids[k], self._arrival, error=message,
                                    transaction_id=None if columns is None else columns[self.transaction_id])

    def _decode(self, requests, responses):
        """The batch's valid requests as one Table (None when none is valid); each refused request gets its
        INVALID_ARG response here, naming the field and its row."""
        parts, taken, sizes, read_only = {name: [] for name, _ in self.fields}, [], [], []
        for k, request in enumerate(requests):
            try:
                arrays, rows = self._tensors(request)
                flag = _read_only(request)
            except RequestError as exc:
                self._refuse(k, exc, responses)
                continue
            for name, values in arrays.items():
                parts[name].append(values)
            taken.append(k)
            sizes.append(rows)
            read_only.append(flag)
        if not taken:
            return None
        columns = {name: p[0] if len(p) == 1 else np.concatenate(p) for name, p in parts.items()}
        table = Table(taken, columns, np.array(sizes), np.array(read_only))
        refused = {}  # position in table.requests -> RequestError, the first problem of each
        for name, kind in self.fields:
            if kind == "string":
                columns[name], bad = _strings(columns[name])
                table.charge(refused, np.array(sorted(bad), dtype=np.intp),
                             lambda row, at, n=name, bad=bad: f"input {n!r} row {row}: not UTF-8 text ({bad[at]})")
        for name in self.non_negative:
            v = columns[name]
            table.charge(refused, np.flatnonzero(~(v >= 0) | ~np.isfinite(v)),
                         lambda row, at, n=name, v=v: f"input {n!r} row {row}: {v[at]!r} is not a finite number >= 0")
        t = columns[self.time]
        table.charge(refused, np.flatnonzero((t < MIN_TIME_US) | (t >= MAX_TIME_US)),
                     lambda row, at: f"input {self.time!r} row {row}: {int(t[at])} is outside 1990-01-01..2200-01-01 "
                                     "UTC; send epoch microseconds (seconds * 1_000_000)")
        for j, exc in refused.items():
            self._refuse(table.requests[j], exc, responses)
        return table.without(refused)

    def _tensors(self, request):
        """(the request's input arrays by field name, its rows), or RequestError naming the input."""
        given = {t.name(): t for t in request.inputs()}
        arrays, rows = {}, None
        for name, _ in self.fields:
            tensor = given.get(name)
            if tensor is None:
                raise RequestError(f"input {name!r} is missing; the model takes {[n for n, _ in self.fields]}")
            values = tensor.as_numpy().reshape(-1)
            if rows is None:
                rows = len(values)
            elif len(values) != rows:
                raise RequestError(f"input {name!r} has {len(values)} rows, the others {rows}; send one row per "
                                   "transaction in every input")
            arrays[name] = values
        return arrays, rows

    def _score(self, table, responses):
        """History for every row of `table` (one store call), then the trees (one run); fills `responses`."""
        cols, degraded = table.columns, False
        try:
            history = self.history.features(cols[self.entity], cols[self.time], {v: cols[v] for v in self.values},
                                             cols[self.transaction_id], update=~table.read_only_rows())
        except StoreUnavailable as exc:
            if self.policy == "error":
                message = (f"{self.label}: {exc}; retry later (a retried transaction_id is counted once), or "
                           "export with --on-store-unavailable score_without_history")
                for j, k in enumerate(table.requests):
                    responses[k] = self._error(message, pb_utils.TritonError.UNAVAILABLE)
                    self._log_error(k, message, table.request_columns(j))
                return
            history = np.full((len(cols[self.time]), len(self.names)), np.nan)
            degraded = True
            self.monitor.degraded.increment(len(table.requests))  # at once: the answers that alert say the store is down
        feeds = {}
        for name in self.graph_inputs:
            if name in cols:
                feeds[name] = cols[name].reshape(-1, 1)
            else:
                feeds[name] = history[:, self.history_column[name]].astype(np.float32).reshape(-1, 1)
        scores = self.session.run([self.output], feeds)[0]
        flags = np.full((len(scores), 1), degraded, dtype=np.bool_)
        monitor, entities = self.monitor, None
        for j, k in enumerate(table.requests):
            a, b = table.bounds[j], table.bounds[j + 1]
            answer = scores[a:b]
            responses[k] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(self.output, answer), pb_utils.Tensor(DEGRADED_OUTPUT, flags[a:b])])
            monitor.answered(answer, self._started)
            if monitor.should_log(self._ids[k]):
                if entities is None:
                    entities = np.char.add(f"{self.entity}=", cols[self.entity].astype(str))
                monitor.log.append(self._ids[k], self._arrival, score=answer[:, -1],
                                   features=history[a:b].astype(np.float32), raw=table.request_columns(j),
                                   transaction_id=cols[self.transaction_id][a:b], entity=entities[a:b],
                                   degraded=degraded)

    @staticmethod
    def _error(message, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def finalize(self):
        self.monitor.close()  # flushes the prediction log: nothing queued is lost on unload or SIGTERM
        self.session = None
        self.history = None


class Table:
    """The valid requests of one batch as one table: `requests` (their indices in the batch), `columns` (each
    field's rows of all of them, concatenated in request order), `sizes` (rows per request), `read_only` (per
    request); request j holds rows bounds[j]:bounds[j + 1]."""

    def __init__(self, requests, columns, sizes, read_only):
        self.requests, self.columns, self.sizes, self.read_only = requests, columns, sizes, read_only
        self.bounds = np.concatenate(([0], np.cumsum(sizes)))

    def charge(self, refused, rows, message):
        """Record in `refused` (position -> RequestError) the first of `rows` (table rows, ascending) of each
        request not refused yet; `message(row in its request, table row)` says what is wrong."""
        if not rows.size:
            return
        owners = np.searchsorted(self.bounds, rows, side="right") - 1
        for j, first in zip(*np.unique(owners, return_index=True)):
            j = int(j)
            if j not in refused:
                at = int(rows[first])
                refused[j] = RequestError(message(at - int(self.bounds[j]), at))

    def without(self, refused):
        """This table without the `refused` requests (None when none is left)."""
        if not refused:
            return self
        keep = np.array([j not in refused for j in range(len(self.requests))])
        if not keep.any():
            return None
        rows = np.repeat(keep, self.sizes)
        return Table([k for k, kept in zip(self.requests, keep) if kept],
                     {n: c[rows] for n, c in self.columns.items()}, self.sizes[keep], self.read_only[keep])

    def read_only_rows(self):
        return np.repeat(self.read_only, self.sizes)

    def request_columns(self, j):
        """Request j's rows of every column (views)."""
        a, b = self.bounds[j], self.bounds[j + 1]
        return {n: c[a:b] for n, c in self.columns.items()}


def _strings(values):
    """BYTES values as str (ONNX Runtime's string tensors), and {row: reason} of the rows that are not UTF-8."""
    out = np.empty(len(values), dtype=object)
    try:
        out[:] = [v.decode("utf-8") for v in values]
        return out, {}
    except (UnicodeDecodeError, AttributeError):
        pass
    bad = {}
    for row, v in enumerate(values):
        try:
            out[row] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
        except UnicodeDecodeError as exc:
            bad[row] = exc.reason
    return out, bad


def _read_only(request):
    """The request parameter `treeops_read_only` (bool; absent: False)."""
    text = request.parameters()
    if not text or text == "{}":
        return False
    value = json.loads(text).get(READ_ONLY_PARAMETER, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise RequestError(f"request parameter {READ_ONLY_PARAMETER!r} is {value!r}; send true or false")
    return value
