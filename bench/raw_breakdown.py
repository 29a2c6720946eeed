"""Where the Python-backend raw-transaction model's time goes (`--target python-onnx`, the one whose parts can
be timed in process): its parts timed in one run, next to the whole through Triton.

`python -m bench.raw_breakdown` prepares the raw model and its Redis as the serving benchmark does
(bench.online.prepare_raw_model: train, export with raw inputs, backfill), serves it on a real Triton beside a
trivial Python-backend model (identity on one FP64 input, same ServingSettings) and measures, medians over
`calls` calls:

- through Triton, sequential, one blocking gRPC call at a time: the bare round trip (ServerLive, "health"), the
  identity model (d: what the Python backend itself costs per request), the raw model on one transaction (e);
- in this process, on the exported version's own model.py (loaded from its version folder and initialised with
  the exported config, so the ORT session and the Redis client are the served ones), for batches of 1 and of
  `batch` one-row requests (what Triton's dynamic batcher hands to one execute at load):
  (a) `_decode` of the batch's requests (into one table), (b) `OnlineHistory.features` for the table's rows (one
  round trip, one Lua call for all rows; fresh transactions each call), beside a bare PING on the same connection
  and, at batch 1, the Lua time per call Redis itself counts (INFO commandstats), (c) the raw graph's
  `session.run` on the feeds `execute` builds, and the whole `execute` (its rest = execute - a - b - c: feeds,
  responses, metrics, and the parts running slower in turn than alone: under cProfile, session.run inside execute
  takes ~3x its time alone, with Redis's socket I/O in between evicting its caches);
- the compiled forest (tl2cgen, as the native backend runs it) on the same model, 1 and `batch` rows: the floor
  for an estimate of a C backend with a C Redis client (health + PING + Lua + forest; an estimate, not measured;
  Lua is counted as rows x one single-row call, an upper bound now that a batch's rows share one script call).

The in-process model runs under a stand-in for `triton_python_backend_utils` (tensors hold numpy arrays,
metrics count nothing): what the real one costs inside the stub is in (d). Triton is measured first, so the
in-process parts see histories longer by the transactions Triton wrote (a few per card).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from google.protobuf import json_format
from tritonclient.grpc import service_pb2

from bench.online import RAW_MODEL, RawModel, new_transactions, prepare_raw_model, raw_payloads
from bench.requests import INFER_METHOD, LIVE_METHOD
from bench.sampling import Observer
from bench.settings import RawBenchSpec
from bench.steps import sequential_step
from export.compiled_forest import compile_forest, compiled_scorer
from export.repository import ModelRepository
from export.triton_config import ServingSettings, TensorSpec, model_config, parse, render
from server.installation import find_triton
from server.launcher import TritonServer, free_port
from server.settings import ONLINE_STORE_URL_ENV, TritonSettings

log = logging.getLogger(__name__)

IDENTITY_MODEL = "identity"
HEALTH, IDENTITY, WHOLE = "health (gRPC ServerLive) via Triton", "d identity model via Triton", "e raw model via Triton"
EXECUTE = "execute (in-process, whole)"
PING, LUA = "  PING, same connection", "  Lua per call (Redis commandstats)"
#: The parts whose sum is set against (e), at batch 1.
SUM_PARTS = ("a decode", "b history features", "c ORT session.run", IDENTITY)
_IDENTITY_PY = '''"""Identity on one input: what the Python backend costs per request, with no work of its own."""
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())]) for r in requests]
'''


#: The raw model timed: the Python backend's (its model.py runs in this process too).
PYTHON_TARGET = "python-onnx"


@dataclass(frozen=True)
class BreakdownSettings:
    """raw: the raw model and store (bench.online; its target None or PYTHON_TARGET, which the breakdown
    exports); calls / warmup: timed and untimed calls of every part; batch: one-row requests per execution of
    the batched in-process parts (Triton formed ~10 at 32 in flight)."""

    raw: RawBenchSpec = field(default_factory=RawBenchSpec)
    serving: ServingSettings = field(default_factory=ServingSettings)
    calls: int = 1000
    warmup: int = 100
    batch: int = 10

    def __post_init__(self) -> None:
        problems = self.raw.problems()
        if self.raw.target not in (None, PYTHON_TARGET):
            problems.append(f"the breakdown times the parts of the Python-backend raw model ({PYTHON_TARGET}), "
                            f"not {self.raw.target!r}")
        if min(self.calls, self.warmup, self.batch) < 1:
            problems.append(f"calls, warmup and batch must be >= 1, got {self.calls}, {self.warmup}, {self.batch}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Part:
    """One timed part: median µs per call of `requests` one-row requests (0 for the bare round trips)."""

    name: str
    requests: int
    p50_us: float


@dataclass(frozen=True)
class Breakdown:
    """The parts of one run; `load`: the machine's load averages (1, 5, 15 min) when it ended."""

    parts: list[Part]
    trees: int
    calls: int
    load: str

    def us(self, name: str, requests: int = 1) -> float:
        for p in self.parts:
            if p.name == name and p.requests == requests:
                return p.p50_us
        raise KeyError(f"no part {name!r} at {requests} requests; parts: {[(p.name, p.requests) for p in self.parts]}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The table: each part at batch 1 with its share of (e), then the batched parts, the sum and the estimate."""
        e = self.us(WHOLE)
        out = [f"raw path breakdown ({self.trees} trees, medians of {self.calls} calls; {self.load})",
               f"{'part':<48}{'batch':>6}{'us':>10}{'of (e)':>9}{'us/txn':>9}"]
        for p in sorted(self.parts, key=lambda p: p.requests > 1):  # batch 1 first, order kept within
            share = f"{p.p50_us / e:8.0%}" if p.requests <= 1 else " " * 8
            per = f"{p.p50_us / p.requests:9.1f}" if p.requests else " " * 9
            out.append(f"{p.name:<48}{p.requests:>6}{p.p50_us:>10.1f} {share}{per}")
        total = sum(self.us(n) for n in SUM_PARTS)
        out.append(f"(a)+(b)+(c)+(d) = {total:.0f} us vs (e) {e:.0f} us ({total / e:.0%}); in-process execute + (d) = "
                   f"{self.us(EXECUTE) + self.us(IDENTITY):.0f} us; (e) / health = {e / self.us(HEALTH, 0):.2f}x")
        for n in sorted({p.requests for p in self.parts if p.name == EXECUTE}):
            est = self.estimate_c_us(n)
            out.append(f"ESTIMATE (not measured), C backend + hiredis, {n} row(s): health + PING + Lua x{n} + compiled "
                       f"forest = {est:.0f} us ({est / self.us(HEALTH, 0):.2f}x health)")
        return out

    def estimate_c_us(self, rows: int) -> float:
        """health + one Redis round trip + the Lua calls of `rows` rows + the compiled forest on `rows` rows."""
        return (self.us(HEALTH, 0) + self.us(PING, 0)
                + rows * self.us(LUA, 0) + self.us("compiled forest", rows))





def run_breakdown(settings: BreakdownSettings, work: Path) -> Breakdown:
    """The whole breakdown in `work` (emptied parts of it: the raw model's data, store and repository)."""
    s = settings
    repository = work / "model_repository"
    with prepare_raw_model(replace(s.raw, target=PYTHON_TARGET), s.serving, repository, work / "raw") as model:
        _write_identity(repository, s.serving)
        in_process = sum(_needed(n, s) for n in _sizes(s))
        frame = new_transactions(model, s.warmup + s.calls + in_process, s.raw.seed + 1)
        served, frame = frame[: s.warmup + s.calls], frame[s.warmup + s.calls:]
        parts = _through_triton(model, repository, work, served, s)
        parts += _in_process(model, repository, frame, s)
        parts += _compiled_forest(model, work, s)
    load = "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return Breakdown(parts, model.booster.num_boosted_rounds(), s.calls, load)


def _write_identity(repository: Path, serving: ServingSettings) -> None:
    x = TensorSpec("x", (1,), "TYPE_FP64")
    cfg = model_config(IDENTITY_MODEL, inputs=[x], outputs=[TensorSpec("y", (1,), "TYPE_FP64")], serving=serving,
                       versions=[1], backend="python")
    folder = repository / IDENTITY_MODEL
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(render(cfg))
    (folder / "1" / "model.py").write_text(_IDENTITY_PY)


def _through_triton(model: RawModel, repository: Path, work: Path, served: pl.DataFrame,
                    s: BreakdownSettings) -> list[Part]:
    models = (model.name, IDENTITY_MODEL)
    triton = TritonSettings(model_repository=repository, model_repository_uri=None, host="127.0.0.1",
                            bind_address="127.0.0.1", grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port(), model_control_mode="explicit", load_models=models,
                            admin_key=None, insecure_admin=True,  # loopback only, one run
                            grpc_use_ssl=False, grpc_use_ssl_mutual=False, backend_directory=None,
                            online_store_url=model.store_url)
    server = TritonServer(triton, find_triton(None, work / "triton"), work / "triton.log")
    server.start(timeout_s=120, models=models)
    try:
        url = server.settings.grpc_url
        live = [service_pb2.ServerLiveRequest().SerializeToString()]
        identity = service_pb2.ModelInferRequest(model_name=IDENTITY_MODEL)
        identity.inputs.add(name="x", datatype="FP64", shape=[1, 1])
        identity.outputs.add(name="y")
        identity.raw_input_contents.append(np.float64(1.5).tobytes())
        raw = raw_payloads(model.signature, served, model.name)
        parts = []
        for name, served_model, method, payloads, rows in (
                (HEALTH, model.name, LIVE_METHOD, live, 0),
                (IDENTITY, IDENTITY_MODEL, INFER_METHOD, [identity.SerializeToString()], 1),
                (WHOLE, model.name, INFER_METHOD, raw, 1)):
            observe = Observer(url, server.pid, served_model)
            try:
                warm = [payloads[i % len(payloads)] for i in range(s.warmup)]
                timed = payloads[s.warmup:] if len(payloads) > 1 else payloads
                parts.append(Part(name, rows, sequential_step(name, url, method, warm, timed, s.calls, rows,
                                                              observe).p50_us))
            finally:
                observe.close()
    finally:
        server.stop()
    return parts


def _in_process(model: RawModel, repository: Path, frame: pl.DataFrame, s: BreakdownSettings) -> list[Part]:
    served = _load_model(repository, model.store_url)
    requests = _requests(model, frame)
    parts = []
    try:
        for n in _sizes(s):
            parts += _batch_parts(served, requests[: _needed(n, s)], n, s)
            requests = requests[_needed(n, s):]
    finally:
        served.finalize()
    return parts


def _sizes(s: BreakdownSettings) -> list[int]:
    return sorted({1, s.batch})


def _needed(n: int, s: BreakdownSettings) -> int:
    """Fresh one-row requests the parts of `n`-request executions use: history features, one recorded execute,
    then the timed executes (each writes its transactions, so none is sent twice)."""
    return (2 * (s.warmup + s.calls) + 1) * n


def _batch_parts(served: Any, requests: list[Any], n: int, s: BreakdownSettings) -> list[Part]:
    """The in-process parts for executions of `n` one-row requests (`_needed(n, s)` fresh ones)."""
    total = s.warmup + s.calls
    batches = [requests[i * n:(i + 1) * n] for i in range(len(requests) // n)]
    for_history, recorded, for_execute = batches[:total], batches[total], batches[total + 1:]
    decode = _median_us(lambda i: served._decode(for_execute[i], [None] * n), s.calls, s.warmup)
    history = served.history
    args = []
    for batch in for_history:
        c = served._decode(batch, [None] * n).columns
        args.append((c[served.entity], c[served.time], {v: c[v] for v in served.values}, c[served.transaction_id]))
    ping = _median_us(lambda i: history._send([("PING",)]), s.calls, s.warmup)
    history._send([("CONFIG", "RESETSTAT")])
    features = _median_us(lambda i: history.features(*args[i]), s.calls, s.warmup)
    lua = _lua_us_per_call(history)
    feeds = _feeds_of(served, recorded)
    run = _median_us(lambda i: served.session.run([served.output], feeds), s.calls, s.warmup)
    execute = _median_us(lambda i: served.execute(for_execute[i]), s.calls, s.warmup)
    parts = [Part("a decode", n, decode), Part("b history features", n, features),
             Part("c ORT session.run", n, run), Part(EXECUTE, n, execute),
             Part("  rest of execute (execute - a - b - c)", n, execute - decode - features - run)]
    if n == 1:
        parts += [Part(PING, 0, ping), Part(LUA, 0, lua)]
    return parts


def _feeds_of(served: Any, batch: list[Any]) -> dict[str, np.ndarray]:
    """The feeds `execute` gives session.run for `batch` (one call, recorded on the way through)."""
    session, seen = served.session, {}

    class Recording:
        def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> Any:
            seen.update(feeds)
            return session.run(outputs, feeds)

    served.session = Recording()
    try:
        responses = served.execute(batch)
    finally:
        served.session = session
    errors = [error for _, error in responses if error is not None]
    if errors or not seen:
        raise RuntimeError(f"the raw model refused {len(errors)} of {len(batch)} in-process requests "
                           f"(first: {errors[0] if errors else 'none, but ORT was not called'}): nothing to time")
    return seen


def _lua_us_per_call(history: Any) -> float:
    """Redis's own µs per EVALSHA since the last CONFIG RESETSTAT (INFO commandstats)."""
    text = history._send([("INFO", "commandstats")])[0].decode()
    for line in text.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            stats = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
            return float(stats["usec_per_call"])
    raise RuntimeError(f"Redis reported no EVALSHA calls in INFO commandstats: {text[:200]!r}")


def _compiled_forest(model: RawModel, work: Path, s: BreakdownSettings) -> list[Part]:
    x = model.fitted.matrix_raw(model.history.head(max(s.batch, 1000)))
    forest = compiled_scorer(compile_forest(model.booster, x.shape[1], work / "raw_forest.so"))
    out = []
    for n in sorted({1, s.batch}):
        rows = [np.ascontiguousarray(x[i * n:(i + 1) * n]) for i in range(len(x) // n)]
        out.append(Part("compiled forest", n, _median_us(lambda i, r=rows: forest(r[i % len(r)]), s.calls, s.warmup)))
    return out


def _median_us(fn: Callable[[int], Any], calls: int, warmup: int) -> float:
    """Median µs of `fn(i)` for i in warmup..warmup+calls, after `fn(0..warmup-1)` untimed."""
    for i in range(warmup):
        fn(i)
    samples = np.empty(calls)
    for k in range(calls):
        start = time.perf_counter_ns()
        fn(warmup + k)
        samples[k] = time.perf_counter_ns() - start
    return float(np.median(samples) / 1e3)


class _Tensor:
    def __init__(self, name: str, array: np.ndarray, *_: Any) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Request:
    def __init__(self, tensors: list[_Tensor]) -> None:
        self._tensors = tensors

    def inputs(self) -> list[_Tensor]:
        return self._tensors

    def parameters(self) -> str:
        return ""

    def request_id(self) -> str:
        return ""


class _Metric:
    def __init__(self, **_: Any) -> None:
        pass

    def increment(self, _n: float) -> None:
        pass

    set = observe = increment


class _MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2

    def __init__(self, **_: Any) -> None:
        self.Metric = _Metric


def _stand_in_utils() -> types.ModuleType:
    """What model.py uses of triton_python_backend_utils, without the stub's shared memory."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor
    pb.InferenceResponse = lambda output_tensors=None, error=None: (output_tensors, error)
    pb.TritonError = type("TritonError", (Exception,), {"INVALID_ARG": 3, "UNAVAILABLE": 14})
    pb.MetricFamily = _MetricFamily
    return pb


def _load_model(repository: Path, store_url: str) -> Any:
    """The exported raw version's model.py, initialised with its config as Triton would."""
    repo = ModelRepository(repository)
    versions = sorted(int(p.name) for p in (repository / RAW_MODEL).iterdir() if p.name.isdigit())
    folder = repository / RAW_MODEL / str(versions[-1])
    config = parse(repo.read_config(RAW_MODEL) or "", f"{repository / RAW_MODEL}/config.pbtxt")
    with _flat_imports(folder), _environment(online_store_url=store_url):
        spec = importlib.util.spec_from_file_location("treeops_bench_raw_model", folder / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        served = module.TritonPythonModel()
        served.initialize({"model_config": json.dumps(json_format.MessageToDict(config,
                                                                                preserving_proto_field_name=True)),
                           "model_repository": str(repository / RAW_MODEL), "model_version": folder.name,
                           "model_name": RAW_MODEL, "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    return served


@contextlib.contextmanager
def _flat_imports(folder: Path) -> Iterator[None]:
    """model.py imports its neighbours (online_history, ...) and the stub's utils by flat names."""
    before = set(sys.modules)
    sys.modules["triton_python_backend_utils"] = _stand_in_utils()
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:
            if name == "triton_python_backend_utils" or str(folder) in str(getattr(sys.modules[name], "__file__", "")):
                del sys.modules[name]


@contextlib.contextmanager
def _environment(online_store_url: str) -> Iterator[None]:
    saved = os.environ.get(ONLINE_STORE_URL_ENV)
    os.environ[ONLINE_STORE_URL_ENV] = online_store_url
    try:
        yield
    finally:
        if saved is None:
            del os.environ[ONLINE_STORE_URL_ENV]
        else:
            os.environ[ONLINE_STORE_URL_ENV] = saved


def _requests(model: RawModel, frame: pl.DataFrame) -> list[_Request]:
    """One one-row request per row, each input as Triton hands it to model.py ([1, 1], BYTES as bytes objects)."""
    columns = {}
    for t in model.signature.inputs:
        col = frame[t.name]
        if t.datatype == "BYTES":
            columns[t.name] = np.array([v.encode() for v in col.fill_null("").to_list()], dtype=object)
        else:
            values = col.dt.epoch("us") if isinstance(col.dtype, pl.Datetime) else col
            columns[t.name] = np.ascontiguousarray(values.to_numpy(), dtype=t.numpy_dtype)
    return [_Request([_Tensor(k, v[i:i + 1].reshape(1, 1)) for k, v in columns.items()]) for i in range(len(frame))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.raw_breakdown", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="timed calls of every part (median)")
    parser.add_argument("--batch", type=int, default=10, help="one-row requests per batched execution")
    parser.add_argument("--rows", type=int, default=RawBenchSpec.rows, help="transactions trained on and backfilled")
    parser.add_argument("--json", type=Path, help="also write the parts as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = BreakdownSettings(raw=RawBenchSpec(rows=args.rows), calls=args.calls, batch=args.batch,
                                 warmup=max(args.calls // 10, 10))
    with tempfile.TemporaryDirectory(prefix="treeops-bench-breakdown-") as work:
        result = run_breakdown(settings, Path(work))
    print("\n".join(result.lines()))
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
