"""Triton Python-backend model scoring raw transactions: history features from the online store, then the trees.

Copied as `model.py` into a raw-transaction version folder (export/online.py), with `online_history.py`
and `version_files.py` beside it; runs in Triton's stub process and imports nothing from treeops.

Inputs are the raw fields named in the config (dims [1], requests [N, 1]): BYTES strings, INT64
integers and Datetime fields as epoch microseconds UTC, FP64 numbers. For each dynamic batch:

1. Every request is decoded and checked on its own: a string that is not UTF-8, a negative or
   non-finite value of a `non_negative_fields` field (amounts), a time outside 1990-01-01..2200-01-01
   UTC (it catches seconds or milliseconds sent as microseconds) fail that request alone with
   INVALID_ARG naming the field and the row; nothing of a failed request reaches the store.
   (Triton itself refuses a missing input or a wrong datatype, naming it.)
2. One `OnlineHistory.features` call reads and updates the history of the valid rows of all
   requests (one pipelined Redis round trip; rows of one entity applied in (time, row) order, each
   seeing the ones before it; a transaction_id already seen gets the same features and changes
   nothing). Requests with the parameter `treeops_read_only` true are read in a second call with
   update=False: they change no state (re-scoring, shadow traffic).
3. ONNX Runtime scores the raw fields plus the history features (`model.onnx`, the raw graph); one
   response per request: `probabilities` and `treeops_degraded` (BOOL per row).

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
        responses = [None] * len(requests)
        self._ids = [self.monitor.request_id(r) for r in requests]
        decoded = []  # (request index, columns, read_only)
        for k, request in enumerate(requests):
            try:
                decoded.append((k, *self._decode(request)))
            except RequestError as exc:
                message = f"{self.label}: {exc}; nothing was written to the online store"
                responses[k] = self._error(message, pb_utils.TritonError.INVALID_ARG)
                self._log_error(k, message, None)
        for read_only in (False, True):
            part = [d for d in decoded if d[2] is read_only]
            if part:
                self._score(part, read_only, responses)
        return responses

    def _log_error(self, k, message, columns):
        if self.monitor.should_log(self._ids[k]):
            self.monitor.log.append(self._ids[k], self._arrival, error=message,
                                    transaction_id=None if columns is None else columns[self.transaction_id])

    def _decode(self, request):
        """(columns by field name, read_only) of one request, or RequestError naming the field and row."""
        columns, rows = {}, None
        for name, kind in self.fields:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise RequestError(f"input {name!r} is missing; the model takes {[n for n, _ in self.fields]}")
            values = tensor.as_numpy().reshape(-1)
            if rows is None:
                rows = len(values)
            elif len(values) != rows:
                raise RequestError(f"input {name!r} has {len(values)} rows, the others {rows}; send one row per "
                                   "transaction in every input")
            columns[name] = _strings(name, values) if kind == "string" else values
        for name in self.non_negative:
            v = columns[name]
            bad = np.flatnonzero(~(v >= 0) | ~np.isfinite(v))
            if bad.size:
                row = int(bad[0])
                raise RequestError(f"input {name!r} row {row}: {v[row]!r} is not a finite number >= 0")
        t = columns[self.time]
        bad = np.flatnonzero((t < MIN_TIME_US) | (t >= MAX_TIME_US))
        if bad.size:
            row = int(bad[0])
            raise RequestError(f"input {self.time!r} row {row}: {int(t[row])} is outside 1990-01-01..2200-01-01 "
                               "UTC; send epoch microseconds (seconds * 1_000_000)")
        return columns, _read_only(request)

    def _score(self, part, read_only, responses):
        """History for the rows of `part` (one store call), then the trees; fills `responses`."""
        cols = {n: np.concatenate([d[1][n] for d in part]) if len(part) > 1 else part[0][1][n]
                for n, _ in self.fields}
        degraded = False
        try:
            history = self.history.features(cols[self.entity], cols[self.time], {v: cols[v] for v in self.values},
                                             cols[self.transaction_id], update=not read_only)
        except StoreUnavailable as exc:
            if self.policy == "error":
                message = (f"{self.label}: {exc}; retry later (a retried transaction_id is counted once), or "
                           "export with --on-store-unavailable score_without_history")
                for k, columns, _ in part:
                    responses[k] = self._error(message, pb_utils.TritonError.UNAVAILABLE)
                    self._log_error(k, message, columns)
                return
            history = np.full((len(cols[self.time]), len(self.names)), np.nan)
            degraded = True
            self.monitor.degraded.increment(len(part))  # at once: the answers that alert say the store is down
        feeds = {}
        for name in self.graph_inputs:
            if name in cols:
                feeds[name] = cols[name].reshape(-1, 1)
            else:
                feeds[name] = history[:, self.history_column[name]].astype(np.float32).reshape(-1, 1)
        scores = self.session.run([self.output], feeds)[0]
        monitor, start = self.monitor, 0
        for k, columns, _ in part:
            n = len(columns[self.time])
            flag = np.full((n, 1), degraded, dtype=np.bool_)
            answer = scores[start : start + n]
            responses[k] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(self.output, answer), pb_utils.Tensor(DEGRADED_OUTPUT, flag)])
            monitor.answered(answer, self._started)
            if monitor.should_log(self._ids[k]):
                monitor.log.append(self._ids[k], self._arrival, score=answer[:, -1],
                                   features=history[start : start + n].astype(np.float32), raw=columns,
                                   transaction_id=columns[self.transaction_id],
                                   entity=np.char.add(f"{self.entity}=", columns[self.entity].astype(str)),
                                   degraded=degraded)
            start += n

    @staticmethod
    def _error(message, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def finalize(self):
        self.monitor.close()  # flushes the prediction log: nothing queued is lost on unload or SIGTERM
        self.session = None
        self.history = None


def _strings(name, values):
    """BYTES values as str (ONNX Runtime's string tensors), or RequestError naming the row that is not UTF-8."""
    out = np.empty(len(values), dtype=object)
    for row, v in enumerate(values):
        try:
            out[row] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
        except UnicodeDecodeError as exc:
            raise RequestError(f"input {name!r} row {row}: not UTF-8 text ({exc.reason})") from None
    return out


def _read_only(request):
    """The request parameter `treeops_read_only` (bool; absent: False)."""
    value = json.loads(request.parameters() or "{}").get(READ_ONLY_PARAMETER, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise RequestError(f"request parameter {READ_ONLY_PARAMETER!r} is {value!r}; send true or false")
    return value
