"""Serving benchmark: a real Triton serving a 200-tree forest, measured against in-process floors of the same run.

One run (`run_serving_benchmark`):
1. trains the benchmark forest (loadtest.bench_model) and exports it through the real target of
   the chosen runtime (default: native-compiled), parity gate included, into a temporary repository;
2. measures the in-process floor: ONNX Runtime (configured as model.py configures it), xgboost
   `inplace_predict` (1 thread) and, for the compiled runtimes, the tl2cgen forest, on 1 and on
   `batch_rows` rows;
3. starts tritonserver on free ports and measures, each step with Triton's own statistics
   (queue / compute_input / compute_infer / compute_output per request, diffed over the step)
   and the CPU time the client and the server processes spent per request:
   - the bare gRPC round trip (`ServerLive`) and single-row scoring, sequential, one blocking
     call at a time with the same raw gRPC client, so their ratio is the server's added cost;
   - a closed-loop sweep of single-row requests at each concurrency;
   - `batch_rows`-row requests at `batch_concurrency`;
   - the bare round trip under the closed loop at the top concurrency (what the client and
     Triton's gRPC layer do without a model: the ceiling of the sweep on this machine);
   - single rows at the top concurrency again with a standard `grpc.aio` client, to show what
     a usual Python client costs.

Load generator: on a 2-core machine the client shares the CPUs with the server, so its cost
decides what can be measured. `grpc.aio` spends about 100-150 µs of CPU per unary call here
(about 1.5 cores at 12k req/s). The sweep therefore uses a minimal HTTP/2 gRPC client (`H2Load`
below, about 10-20 µs per call): KServe `ModelInfer` requests serialized once, frames written
straight to the socket, responses counted per stream. It speaks plain-text HTTP/2 only; a
request counts as answered when its stream carried exactly the response message size the
server returns to a checked `grpc` call for the same request (Triton answers errors without a
message), RST_STREAM or GOAWAY count as failures. Both clients report their CPU per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from export.compiled_forest import COMPILED_FILE, compiled_scorer
from export.onnx_convert import INPUT_NAME, OUTPUT_NAME, serving_session
from export.triton_config import ServingSettings
from loadtest.bench_model import (
    BENCH_MODEL, RUNTIME_TARGETS, BenchModelSpec, Runtime, export_bench_model, synthetic_rows, train_bench_model,
)
from loadtest.errors import RequestFailedError, SettingsError
from server.installation import find_triton
from server.launcher import TritonServer, free_port
from server.settings import TritonSettings

log = logging.getLogger(__name__)

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
LIVE_METHOD = "/inference.GRPCInferenceService/ServerLive"
#: Distinct payloads cycled through by the load generator (each a different slice of the rows).
_PAYLOADS = 64

Client = Literal["h2", "grpc-aio"]


@dataclass(frozen=True)
class BenchSettings:
    """What one serving benchmark run does; sizes fit a 2-core machine (about a minute) by default.

    model: the forest to train and serve; runtime: what scores it in Triton ("onnxruntime" or "compiled":
    ONNX Runtime or the tl2cgen forest in the Python backend's model.py; "native": the forest in treeops'
    own C backend, see loadtest.bench_model.RUNTIME_TARGETS); serving: its config.pbtxt settings
    (batching, instances);
    triton: tritonserver flags (ports, repository, TLS and admin key are chosen by the benchmark);
    sequential_requests / health_requests: timed calls of the sequential steps (after `warmup_requests`);
    concurrency: closed-loop levels of the single-row sweep, each measured for `step_s` after `warmup_s`;
    batch_rows / batch_concurrency: the large-request step; client: load generator of the sweep and the
    batch step ("h2": the minimal HTTP/2 client, "grpc-aio": grpc.aio); client_processes / connections:
    load-generator processes and HTTP/2 connections per process; reference_client: also run the top
    concurrency with grpc.aio; floor_repeats: timed calls per in-process floor figure; model_source: a
    model.py served instead of the target's (A/B of the request path; None: the target's own).
    """

    model: BenchModelSpec = field(default_factory=BenchModelSpec)
    runtime: Runtime = "native"
    serving: ServingSettings = field(default_factory=ServingSettings)
    triton: TritonSettings = field(default_factory=TritonSettings)
    sequential_requests: int = 2000
    health_requests: int = 2000
    warmup_requests: int = 200
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    step_s: float = 3.0
    warmup_s: float = 0.5
    batch_rows: int = 256
    batch_concurrency: int = 8
    client: Client = "h2"
    client_processes: int = 1
    connections: int = 1
    reference_client: bool = True
    floor_repeats: int = 300
    model_source: Path | None = None

    def __post_init__(self) -> None:
        problems = []
        if min(self.sequential_requests, self.health_requests) < 1 or self.warmup_requests < 0:
            problems.append("sequential_requests and health_requests must be >= 1, warmup_requests >= 0")
        if not self.concurrency or min(self.concurrency) < 1:
            problems.append(f"concurrency needs levels >= 1, got {self.concurrency}")
        if self.step_s <= 0 or self.warmup_s < 0:
            problems.append(f"step_s must be > 0 and warmup_s >= 0, got {self.step_s} and {self.warmup_s}")
        if not 1 <= self.batch_rows <= self.serving.max_batch_size:
            problems.append(f"batch_rows must be 1..max_batch_size ({self.serving.max_batch_size}), got {self.batch_rows}")
        if min(self.batch_concurrency, self.client_processes, self.connections, self.floor_repeats) < 1:
            problems.append("batch_concurrency, client_processes, connections and floor_repeats must be >= 1")
        if self.runtime not in RUNTIME_TARGETS:
            problems.append(f"runtime must be one of {sorted(RUNTIME_TARGETS)}, got {self.runtime!r}")
        if self.client not in ("h2", "grpc-aio"):
            problems.append(f"client must be 'h2' or 'grpc-aio', got {self.client!r}")
        if self.model_source is not None and not Path(self.model_source).is_file():
            problems.append(f"model_source {self.model_source} is not a file")
        if problems:
            raise SettingsError("invalid benchmark settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        out["serving"] = asdict(self.serving)
        out["triton"] = [a for a in self.triton.to_args(redact=True) if _is_tuning_flag(a)]
        out["model_source"] = str(self.model_source) if self.model_source else None
        return out


@dataclass(frozen=True)
class Floor:
    """In-process time of one scoring call (median over repeats) and the rows/s it implies."""

    runtime: str
    rows: int
    p50_us: float
    rows_per_s: float


@dataclass(frozen=True)
class TritonStats:
    """Triton's statistics over one step, per successful request in µs (`get_inference_statistics` diffs).

    `request_us` is Triton's whole time for the request; `mean_batch_rows` is rows per model
    execution (inference_count / execution_count).
    """

    requests: int
    executions: int
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float
    request_us: float
    mean_batch_rows: float


@dataclass(frozen=True)
class Step:
    """One measured step: throughput, latency percentiles, CPU per request and Triton's view of it.

    `client_cpu_us_per_req`: CPU of the load-generator process(es); `server_cpu_us_per_req`: CPU of
    tritonserver and its Python stub processes; both per completed request of the window.
    """

    name: str
    client: str
    concurrency: int
    rows_per_request: int
    requests: int
    failures: int
    duration_s: float
    req_per_s: float
    rows_per_s: float
    p50_us: float
    p99_us: float
    mean_us: float
    client_cpu_us_per_req: float
    server_cpu_us_per_req: float
    triton: TritonStats | None


@dataclass(frozen=True)
class BenchResult:
    """Everything one run measured; `lines()` is the human table, `to_dict()` the JSON."""

    settings: BenchSettings
    floors: list[Floor]
    health: Step
    sequential: Step
    sweep: list[Step]
    batch: Step
    health_loaded: Step
    reference: Step | None
    cpu_count: int
    triton_command: list[str]
    parity_max_abs_diff: float

    def floor(self, runtime: str, rows: int) -> Floor:
        """The floor of `runtime` ("onnxruntime" or "xgboost") on `rows` rows (1 or batch_rows)."""
        return next(f for f in self.floors if f.runtime == runtime and f.rows == rows)

    def sweep_at(self, concurrency: int) -> Step | None:
        return next((s for s in self.sweep if s.concurrency == concurrency), None)

    @property
    def ratios(self) -> dict[str, float]:
        """Served figures against the floors and the bare round trip of the same run."""
        ort1 = self.floor("onnxruntime", 1)
        ortn = self.floor("onnxruntime", self.settings.batch_rows)
        xgbn = self.floor("xgboost", self.settings.batch_rows)
        served_floor = "onnxruntime" if self.settings.runtime == "onnxruntime" else "compiled"  # native: same forest.so
        served1 = self.floor(served_floor, 1)
        servedn = self.floor(served_floor, self.settings.batch_rows)
        best = max(self.sweep, key=lambda s: s.req_per_s)
        return {
            "sequential_p50_over_health_p50": self.sequential.p50_us / self.health.p50_us,
            "sequential_p50_over_onnxruntime_1_row": self.sequential.p50_us / ort1.p50_us,
            "sequential_p50_over_served_runtime_1_row": self.sequential.p50_us / served1.p50_us,
            "best_sweep_req_per_s_over_health_loaded": best.req_per_s / self.health_loaded.req_per_s,
            "batch_rows_per_s_over_onnxruntime": self.batch.rows_per_s / ortn.rows_per_s,
            "batch_rows_per_s_over_xgboost": self.batch.rows_per_s / xgbn.rows_per_s,
            "batch_rows_per_s_over_served_runtime": self.batch.rows_per_s / servedn.rows_per_s,
        }

    @property
    def targets(self) -> dict[str, dict[str, Any]]:
        """The issue's serving targets (2 cores, client on the same machine) against this run's figures."""
        out = {
            "sequential_p50_le_1.75x_health_p50": (self.sequential.p50_us / self.health.p50_us, 1.75, "le"),
            "sequential_p99_le_600_us": (self.sequential.p99_us, 600.0, "le"),
        }
        if self.settings.batch_rows == 256:
            out["batch_256_rows_ge_200k_rows_per_s"] = (self.batch.rows_per_s, 200_000.0, "ge")
        c32 = self.sweep_at(32)
        if c32 is not None:
            out["c32_ge_12000_req_per_s"] = (c32.req_per_s, 12_000.0, "ge")
            out["c32_p99_le_5000_us"] = (c32.p99_us, 5_000.0, "le")
        return {name: {"measured": m, "target": t, "met": m <= t if op == "le" else m >= t}
                for name, (m, t, op) in out.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "cpu_count": self.cpu_count,
            "triton_command": self.triton_command,
            "parity_max_abs_diff": self.parity_max_abs_diff,
            "floors": [asdict(f) for f in self.floors],
            "health": asdict(self.health),
            "sequential": asdict(self.sequential),
            "sweep": [asdict(s) for s in self.sweep],
            "batch": asdict(self.batch),
            "health_loaded": asdict(self.health_loaded),
            "reference": asdict(self.reference) if self.reference else None,
            "ratios": self.ratios,
            "targets": self.targets,
        }

    def lines(self) -> list[str]:
        s, m = self.settings, self.settings.model
        out = [
            f"serving benchmark: {m.trees} trees depth {m.depth}, {m.features} features; {self.cpu_count} CPUs shared "
            f"by server and client ({s.client_processes} process(es), {s.client} client)",
            f"runtime: {s.runtime}; config: dynamic_batching={s.serving.dynamic_batching} "
            f"max_queue_delay_us={s.serving.max_queue_delay_us} preferred={list(s.serving.preferred_batch_sizes)} "
            f"instances={s.serving.instance_count}; latency summaries {'on' if s.triton.summary_latencies else 'off'}",
            "in-process floor (1 thread, median):",
        ]
        for f in self.floors:
            out.append(f"  {f.runtime:<12}{f.rows:>5} rows {f.p50_us:>10.1f} us {f.rows_per_s:>12,.0f} rows/s")
        out += ["over gRPC (cli/srv = CPU us per request; queue..out = Triton's us per request; batch = rows per execution):",
                f"{'step':<17}{'conc':>5}{'rows':>5}{'req/s':>9}{'rows/s':>10}{'p50 us':>9}{'p99 us':>9}"
                f"{'cli':>6}{'srv':>6}{'queue':>7}{'in':>6}{'infer':>7}{'out':>6}{'batch':>7}{'fail':>5}"]
        steps = [self.health, self.sequential, *self.sweep, self.batch, self.health_loaded]
        out += [_step_line(step) for step in steps + ([self.reference] if self.reference else [])]
        r = self.ratios
        out += [
            f"sequential p50 / bare round trip p50: {r['sequential_p50_over_health_p50']:.2f}x "
            f"(p50 {self.sequential.p50_us:.0f} us, p99 {self.sequential.p99_us:.0f} us)",
            f"best sweep / bare round trip under the same load: {r['best_sweep_req_per_s_over_health_loaded']:.2f}",
            f"{s.batch_rows}-row requests: {self.batch.rows_per_s:,.0f} rows/s = "
            f"{r['batch_rows_per_s_over_onnxruntime']:.2f}x onnxruntime, {r['batch_rows_per_s_over_xgboost']:.2f}x "
            "xgboost in-process (1 thread)",
            "targets: " + ", ".join(f"{k} {'met' if v['met'] else 'NOT met'} ({v['measured']:,.2f})"
                                    for k, v in self.targets.items()),
        ]
        return out


def _step_line(s: Step) -> str:
    t = s.triton
    tri = (f"{t.queue_us:>7.0f}{t.compute_input_us:>6.0f}{t.compute_infer_us:>7.0f}{t.compute_output_us:>6.0f}"
           f"{t.mean_batch_rows:>7.1f}") if t else f"{'-':>7}{'-':>6}{'-':>7}{'-':>6}{'-':>7}"
    name = s.name if s.client == "h2" or s.name in ("health", "sequential") else f"{s.name} {s.client}"
    return (f"{name:<17}{s.concurrency:>5}{s.rows_per_request:>5}{s.req_per_s:>9,.0f}{s.rows_per_s:>10,.0f}"
            f"{s.p50_us:>9.0f}{s.p99_us:>9.0f}{s.client_cpu_us_per_req:>6.0f}{s.server_cpu_us_per_req:>6.0f}"
            f"{tri}{s.failures:>5}")


def _is_tuning_flag(arg: str) -> bool:
    return not arg.startswith(("--model-repository", "--grpc-port", "--http-port", "--metrics-port",
                               "--backend-directory", "--grpc-address", "--http-address", "--metrics-address",
                               "--load-model"))


# ---------------------------------------------------------------------------------------------------------------------
# In-process floors


def measure_floors(model_path: Path, booster: Any, rows: np.ndarray, batch_rows: int, repeats: int,
                   compiled: Path | None = None) -> list[Floor]:
    """Median time of ONNX Runtime (as model.py configures it), xgboost (1 thread) and, given its path, the
    compiled forest, on 1 and `batch_rows` rows."""
    session = serving_session(model_path)
    forest = compiled_scorer(compiled) if compiled is not None else None
    booster = booster.copy()
    booster.set_param({"nthread": 1})
    floors = []
    for n in sorted({1, batch_rows}):
        x = np.ascontiguousarray(rows[:n], dtype=np.float32)
        runs: dict[str, Callable[[], Any]] = {
            "onnxruntime": lambda x=x: session.run([OUTPUT_NAME], {INPUT_NAME: x}),
            "xgboost": lambda x=x: booster.inplace_predict(x),
        }
        if forest is not None:
            runs["compiled"] = lambda x=x: forest(x)
        for runtime, fn in runs.items():
            p50 = _median_us(fn, repeats if n == 1 else max(repeats // 4, 5))
            floors.append(Floor(runtime, n, p50, n / p50 * 1e6))
    return floors


def _median_us(fn: Callable[[], Any], repeats: int) -> float:
    for _ in range(max(repeats // 10, 3)):
        fn()
    samples = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter_ns()
        fn()
        samples[i] = time.perf_counter_ns() - start
    return float(np.median(samples) / 1e3)


# ---------------------------------------------------------------------------------------------------------------------
# Requests, CPU accounting and Triton statistics


def infer_payloads(rows: np.ndarray, rows_per_request: int, model: str = BENCH_MODEL, count: int = _PAYLOADS) -> list[bytes]:
    """Serialized KServe `ModelInferRequest`s of `rows_per_request` consecutive rows each (cycled through `rows`)."""
    payloads = []
    span = max(len(rows) - rows_per_request + 1, 1)
    for i in range(count):
        start = (i * rows_per_request) % span
        x = np.ascontiguousarray(rows[start : start + rows_per_request], dtype=np.float32)
        request = service_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=list(x.shape))
        request.outputs.add(name=OUTPUT_NAME)
        request.raw_input_contents.append(x.tobytes())
        payloads.append(request.SerializeToString())
    return payloads


def decode_outputs(response: bytes) -> np.ndarray:
    """The `probabilities` matrix of a serialized `ModelInferResponse`."""
    message = service_pb2.ModelInferResponse.FromString(response)
    shape = list(message.outputs[0].shape)
    return np.frombuffer(message.raw_output_contents[0], dtype=np.float32).reshape(shape)


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group `pgid` (tritonserver and its stubs)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Observer:
    """Samples the server's CPU seconds (its process group) and Triton's cumulative statistics of one model."""

    def __init__(self, url: str, pgid: int, model: str) -> None:
        self.url, self.pgid, self.model = url, pgid, model
        self._client: grpcclient.InferenceServerClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "pgid": self.pgid, "model": self.model, "_client": None}

    def sample(self) -> tuple[float, dict[str, int]]:
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        stats = self._client.get_inference_statistics(model_name=self.model).model_stats
        raw = dict.fromkeys(("requests", "executions", "inferences", "queue", "compute_input", "compute_infer",
                             "compute_output", "success"), 0)
        for m in stats:
            s = m.inference_stats
            raw["requests"] += s.success.count
            raw["executions"] += m.execution_count
            raw["inferences"] += m.inference_count
            for key in ("queue", "compute_input", "compute_infer", "compute_output", "success"):
                raw[key] += getattr(s, key).ns
        return group_cpu_s(self.pgid), raw

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def stats_diff(before: dict[str, int], after: dict[str, int]) -> TritonStats | None:
    """Per-request Triton statistics between two `Observer.sample()` statistics (None if no request ran)."""
    d = {k: after[k] - before[k] for k in after}
    n = d["requests"]
    if n <= 0:
        return None
    per = lambda key: d[key] / n / 1e3  # noqa: E731
    return TritonStats(n, d["executions"], per("queue"), per("compute_input"), per("compute_infer"),
                       per("compute_output"), per("success"), d["inferences"] / max(d["executions"], 1))


# ---------------------------------------------------------------------------------------------------------------------
# Load generation: sequential blocking calls, the minimal HTTP/2 client, grpc.aio


def sequential_latency(url: str, method: str, payloads: Sequence[bytes], requests: int) -> tuple[np.ndarray, float]:
    """`requests` blocking raw gRPC calls, one at a time; returns the latencies (ns) and the client CPU seconds."""
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(method)
        samples = np.empty(requests, dtype=np.int64)
        cpu0 = time.process_time()
        for i in range(requests):
            payload = payloads[i % len(payloads)]
            start = time.perf_counter_ns()
            call(payload)
            samples[i] = time.perf_counter_ns() - start
        return samples, time.process_time() - cpu0


def response_size(url: str, method: str, payload: bytes) -> int:
    """Bytes of the gRPC response message to `payload` (a checked call: raises on any error status)."""
    with grpc.insecure_channel(url) as channel:
        try:
            return len(channel.unary_unary(method)(payload))
        except grpc.RpcError as exc:
            raise RequestFailedError(f"{method} failed on {url}: {exc.code().name} {exc.details()}") from exc


@dataclass
class _Window:
    """The measuring window of a closed loop, in `time.perf_counter_ns()` (CLOCK_MONOTONIC, shared by processes)."""

    start_ns: int
    stop_ns: int
    latencies_ns: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
_END_STREAM, _END_HEADERS, _ACK, _PADDED = 0x1, 0x4, 0x1, 0x8
_MAX_WINDOW = 2**31 - 1


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _hpack_literal(value: str) -> bytes:
    raw = value.encode()
    if len(raw) >= 127:
        raise SettingsError(f"header value too long for the load generator: {value!r}")
    return bytes((len(raw),)) + raw


def grpc_request_headers(authority: str, method: str) -> bytes:
    """HPACK block of a gRPC request (POST, http, path, authority, application/grpc, te: trailers), no indexing."""
    return (b"\x83\x86" + b"\x04" + _hpack_literal(method) + b"\x01" + _hpack_literal(authority)
            + b"\x0f\x10" + _hpack_literal("application/grpc") + b"\x00" + _hpack_literal("te")
            + _hpack_literal("trailers"))


class H2Load(asyncio.Protocol):
    """A closed loop of `users` over one HTTP/2 connection: each sends its next gRPC call when the last one ends.

    Every call sends one of `messages` (serialized protobuf) to `method`; the answer must carry
    `expected_bytes` of gRPC message. Latencies of calls started inside `window` are recorded.
    Flow control is honoured both ways; server PINGs and SETTINGS are acknowledged.
    """

    def __init__(self, authority: str, method: str, messages: Sequence[bytes], expected_bytes: int, users: int,
                 window: _Window, done: asyncio.Future[None], first: int = 0) -> None:
        self._block = grpc_request_headers(authority, method)
        self._headers_head = struct.pack(">I", len(self._block))[1:] + bytes((_HEADERS, _END_HEADERS))
        self._bodies = [b"\x00" + struct.pack(">I", len(m)) + m for m in messages]
        self._expected = expected_bytes + 5
        self._users = users
        self._window = window
        self._done = done
        self._next = first
        self._buffer = bytearray()
        self._stream_id = 1
        self._streams: dict[int, list[int]] = {}  # id -> [start_ns, received message bytes]
        self._active = 0
        self._max_frame = 16384
        self._send_window = 65535
        self._initial_window = 65535
        self._stream_windows: dict[int, int] = {}
        self._pending: list[list[Any]] = []  # [stream id, memoryview of what is left to send]
        self._unacked = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, _MAX_WINDOW)  # no push, big stream windows
        transport.write(_H2_PREFACE + _frame(_SETTINGS, 0, 0, settings)  # type: ignore[attr-defined]
                        + _frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", _MAX_WINDOW - 65535)))
        self._active = self._users
        for _ in range(self._users):
            self._send()

    def _send(self) -> None:
        stream = self._stream_id
        self._stream_id += 2
        body = self._bodies[self._next % len(self._bodies)]
        self._next += 1
        self._streams[stream] = [time.perf_counter_ns(), 0]
        sid = struct.pack(">I", stream)
        n = len(body)
        if n <= self._max_frame and n <= self._send_window and n <= self._initial_window and not self._pending:
            self._send_window -= n
            self._transport.write(b"".join((self._headers_head, sid, self._block,  # type: ignore[union-attr]
                                            struct.pack(">I", n)[1:], b"\x00\x01", sid, body)))
            return
        self._transport.write(self._headers_head + sid + self._block)  # type: ignore[union-attr]
        self._stream_windows[stream] = self._initial_window
        self._pending.append([stream, memoryview(body)])
        self._flush()

    def _flush(self) -> None:
        out = []
        while self._pending:
            stream, rest = self._pending[0]
            n = min(len(rest), self._max_frame, self._send_window, self._stream_windows[stream])
            if n <= 0:
                break
            last = n == len(rest)
            out.append(_frame(_DATA, _END_STREAM if last else 0, stream, bytes(rest[:n])))
            self._send_window -= n
            self._stream_windows[stream] -= n
            if last:
                self._pending.pop(0)
                del self._stream_windows[stream]
            else:
                self._pending[0][1] = rest[n:]
        if out:
            self._transport.write(b"".join(out))  # type: ignore[union-attr]

    def _finish(self, stream: int, failure: str | None) -> None:
        entry = self._streams.pop(stream, None)
        if entry is None:
            return
        now = time.perf_counter_ns()
        start, received = entry
        w = self._window
        if w.start_ns <= start < w.stop_ns:
            if failure is None and received != self._expected:
                failure = f"answer of {received - 5} message bytes, expected {self._expected - 5} (an error status?)"
            if failure is None:
                w.latencies_ns.append(now - start)
            else:
                w.failures.append(failure)
        if now < w.stop_ns and self._transport is not None and not self._transport.is_closing():
            self._send()
            return
        self._active -= 1
        if self._active <= 0 and not self._done.done():
            self._done.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if end - pos < 9 + length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            body = pos + 9
            pos = body + length
            if kind == _DATA:
                entry = self._streams.get(stream)
                if entry is not None:
                    entry[1] += length - (buf[body] + 1 if flags & _PADDED else 0)
                self._unacked += length
                if flags & _END_STREAM:
                    self._finish(stream, None)
            elif kind == _HEADERS:
                if flags & _END_STREAM:
                    self._finish(stream, None)
            elif kind == _WINDOW_UPDATE:
                increment = int.from_bytes(buf[body : body + 4], "big") & 0x7FFFFFFF
                if stream == 0:
                    self._send_window += increment
                elif stream in self._stream_windows:
                    self._stream_windows[stream] += increment
                if self._pending:
                    self._flush()
            elif kind == _SETTINGS and not flags & _ACK:
                self._settings(bytes(buf[body:pos]))
            elif kind == _PING and not flags & _ACK:
                self._transport.write(_frame(_PING, _ACK, 0, bytes(buf[body:pos])))  # type: ignore[union-attr]
            elif kind == _RST_STREAM:
                self._finish(stream, f"RST_STREAM error code {int.from_bytes(buf[body:body + 4], 'big')}")
            elif kind == _GOAWAY:
                for open_stream in list(self._streams):
                    self._finish(open_stream, "GOAWAY from the server")
        del buf[:pos]
        if self._unacked > 1 << 28:
            self._transport.write(_frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", self._unacked)))  # type: ignore[union-attr]
            self._unacked = 0

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - 5, 6):
            ident, value = struct.unpack_from(">HI", payload, offset)
            if ident == 0x4:
                delta, self._initial_window = value - self._initial_window, value
                for stream in self._stream_windows:
                    self._stream_windows[stream] += delta
            elif ident == 0x5:
                self._max_frame = value
        self._transport.write(_frame(_SETTINGS, _ACK, 0))  # type: ignore[union-attr]
        if self._pending:
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for stream in list(self._streams):
            start = self._streams.pop(stream)[0]
            if self._window.start_ns <= start < self._window.stop_ns:
                self._window.failures.append(f"connection lost: {exc or 'closed by the server'}")
        self._transport = None
        if not self._done.done():
            self._done.set_result(None)


@dataclass(frozen=True)
class LoadJob:
    """One closed-loop step for a load-generator process (picklable)."""

    client: Client
    method: str
    payload_key: str
    concurrency: int
    start_ns: int
    stop_ns: int
    connections: int


async def _closed_loop(url: str, payload_sets: dict[str, tuple[list[bytes], int]], job: LoadJob,
                       observe: Observer | None) -> dict[str, Any]:
    """Run `job` until its window closes; `observe` samples the server at both ends of the window."""
    messages, expected = payload_sets[job.payload_key]
    window = _Window(job.start_ns, job.stop_ns)
    marks: list[tuple[float, float, dict[str, int]]] = []

    async def window_marks() -> None:
        for at in (window.start_ns, window.stop_ns):
            await asyncio.sleep(max(at - time.perf_counter_ns(), 0) / 1e9)
            cpu, stats = observe.sample() if observe is not None else (0.0, {})
            marks.append((time.process_time(), cpu, stats))

    shares = [job.concurrency // job.connections + (i < job.concurrency % job.connections)
              for i in range(job.connections)]
    if job.client == "h2":
        await _h2_loop(url, job.method, messages, expected, [s for s in shares if s], window, window_marks())
    else:
        await _aio_loop(url, job.method, messages, expected, [s for s in shares if s], window, window_marks())
    out: dict[str, Any] = {"latencies_ns": window.latencies_ns, "failures": window.failures,
                           "cpu_s": marks[1][0] - marks[0][0]}
    if observe is not None:
        out["server_cpu_s"] = marks[1][1] - marks[0][1]
        out["stats"] = (marks[0][2], marks[1][2])
    return out


async def _h2_loop(url: str, method: str, messages: list[bytes], expected: int, shares: list[int], window: _Window,
                   marks: Any) -> None:
    loop = asyncio.get_running_loop()
    host, port = url.rsplit(":", 1)
    connections = []
    for i, users in enumerate(shares):
        done: asyncio.Future[None] = loop.create_future()
        transport, _ = await loop.create_connection(
            lambda users=users, done=done, i=i: H2Load(url, method, messages, expected, users, window, done, first=i * 7),
            host, int(port))
        connections.append((transport, done))
    try:
        await marks
        for _, done in connections:
            try:
                await asyncio.wait_for(done, timeout=60)
            except asyncio.TimeoutError:
                raise RequestFailedError(f"calls to {url} were still open 60 s after the step ended: is Triton "
                                         "stuck? See its log (triton.log in the benchmark's workdir)") from None
    finally:
        for transport, _ in connections:
            transport.close()


async def _aio_loop(url: str, method: str, messages: list[bytes], expected: int, shares: list[int], window: _Window,
                    marks: Any) -> None:
    channels = [grpc.aio.insecure_channel(url) for _ in shares]
    try:
        async def user(call: Any, k: int) -> None:
            i = k * 7
            while True:
                start = time.perf_counter_ns()
                if start >= window.stop_ns:
                    return
                failure = None
                try:
                    answer = await call(messages[i % len(messages)])
                    if len(answer) != expected:
                        failure = f"answer of {len(answer)} message bytes, expected {expected}"
                except grpc.aio.AioRpcError as exc:
                    failure = f"{exc.code().name}: {exc.details()}"
                if window.start_ns <= start < window.stop_ns:
                    if failure is None:
                        window.latencies_ns.append(time.perf_counter_ns() - start)
                    else:
                        window.failures.append(failure)
                i += 1

        calls = [ch.unary_unary(method) for ch in channels]
        users = [user(calls[c], k) for c, share in enumerate(shares) for k in range(share)]
        await asyncio.gather(marks, *users)
    finally:
        for ch in channels:
            await ch.close()


def _client_process(conn: Any, url: str, payload_sets: dict[str, tuple[list[bytes], int]],
                    observe: Observer | None) -> None:
    """A load-generator process: says it is ready, then runs closed loops on request until it receives None."""
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            result = asyncio.run(_closed_loop(url, payload_sets, job, observe))
        except Exception as exc:  # reported to the parent, which raises RequestFailedError
            result = {"error": repr(exc)}
        conn.send(result)


class LoadGenerator:
    """Closed-loop load from this process (`processes == 1`) or from that many spawned processes.

    `payload_sets` maps a key to (serialized requests, expected response message bytes). `observe`
    is sampled by this process, or by the first spawned one, at the ends of each step's window.
    """

    def __init__(self, url: str, payload_sets: dict[str, tuple[list[bytes], int]], processes: int = 1,
                 connections: int = 1, observe: Observer | None = None) -> None:
        self.url = url
        self.payload_sets = payload_sets
        self.connections = connections
        self.observe = observe
        self._workers: list[tuple[Any, Any]] = []
        if processes > 1:
            ctx = mp.get_context("spawn")
            for i in range(processes):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_client_process, args=(child, url, payload_sets, observe if i == 0 else None),
                                   daemon=True)
                proc.start()
                self._workers.append((proc, parent))
            for proc, parent in self._workers:  # spawned interpreters take a second or two to import
                if not parent.poll(60) or parent.recv() != "ready":
                    self.close()
                    raise RequestFailedError("a load-generator process did not start within 60 s")

    def run(self, client: Client, method: str, key: str, concurrency: int, warmup_s: float,
            step_s: float) -> dict[str, Any]:
        """Latencies (ns), failures, client CPU seconds and the observer's samples of one closed-loop step."""
        lead_ns = 20_000_000 if not self._workers else 200_000_000  # time for the workers to receive the job
        start = time.perf_counter_ns() + lead_ns + int(warmup_s * 1e9)
        n = max(len(self._workers), 1)
        shares = [concurrency // n + (i < concurrency % n) for i in range(n)]
        shares[0] = max(shares[0], 1)  # the observing process always takes part
        jobs = [LoadJob(client, method, key, share, start, start + int(step_s * 1e9), min(self.connections, share))
                for share in shares if share]
        if not self._workers:
            return asyncio.run(_closed_loop(self.url, self.payload_sets, jobs[0], self.observe))
        for (_, conn), job in zip(self._workers, jobs):
            conn.send(job)
        parts = [conn.recv() for (_, conn), _ in zip(self._workers, jobs)]
        errors = [p["error"] for p in parts if "error" in p]
        if errors:
            raise RequestFailedError(f"a load-generator process failed: {errors[0]}")
        merged: dict[str, Any] = {
            "latencies_ns": [x for p in parts for x in p["latencies_ns"]],
            "failures": [x for p in parts for x in p["failures"]],
            "cpu_s": sum(p["cpu_s"] for p in parts),
        }
        merged.update({k: parts[0][k] for k in ("server_cpu_s", "stats") if k in parts[0]})
        return merged

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._workers = []

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------------
# The run


def make_step(name: str, client: str, concurrency: int, rows_per_request: int,
              latencies_ns: Sequence[int] | np.ndarray, failures: int, duration_s: float, client_cpu_s: float,
              server_cpu_s: float, triton: TritonStats | None) -> Step:
    """A Step from raw samples; RequestFailedError when nothing completed."""
    lat = np.asarray(latencies_ns, dtype=np.float64) / 1e3
    n = len(lat)
    if n == 0:
        raise RequestFailedError(f"step {name!r} completed no request in {duration_s:.1f}s ({failures} failures)")
    return Step(
        name=name, client=client, concurrency=concurrency, rows_per_request=rows_per_request, requests=n,
        failures=failures, duration_s=duration_s, req_per_s=n / duration_s, rows_per_s=n * rows_per_request / duration_s,
        p50_us=float(np.percentile(lat, 50)), p99_us=float(np.percentile(lat, 99)), mean_us=float(lat.mean()),
        client_cpu_us_per_req=client_cpu_s / n * 1e6, server_cpu_us_per_req=server_cpu_s / n * 1e6, triton=triton,
    )


@contextmanager
def serve_bench_model(settings: BenchSettings, workdir: Path) -> Iterator[tuple[TritonServer, float, Any]]:
    """Train, export (parity-gated) and serve the benchmark model; yields the server, parity diff and booster.

    The server is stopped (process group killed) when the block exits.
    """
    booster = train_bench_model(settings.model)
    root = workdir / "model_repository"
    if root.exists():
        shutil.rmtree(root)
    report = export_bench_model(booster, settings.model.features, root, settings.serving, seed=settings.model.seed,
                                runtime=settings.runtime)
    if settings.model_source is not None:
        shutil.copyfile(settings.model_source, root / BENCH_MODEL / "1" / "model.py")
    triton = settings.triton.model_copy(update={
        "model_repository": root, "model_repository_uri": None, "host": "127.0.0.1", "bind_address": "127.0.0.1",
        "grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port(),
        "model_control_mode": "explicit", "load_models": (BENCH_MODEL,), "admin_key": None,
        "grpc_use_ssl": False, "grpc_use_ssl_mutual": False, "backend_directory": None,
    })
    server = TritonServer(triton, find_triton(None, workdir / "triton"), workdir / "triton.log")
    server.start(timeout_s=120, models=[BENCH_MODEL])
    try:
        yield server, report.max_abs_diff, booster
    finally:
        server.stop()


def run_serving_benchmark(
    settings: BenchSettings | None = None,
    *,
    out_path: Path | None = None,
    workdir: Path | None = None,
) -> BenchResult:
    """Run the whole benchmark once (module docstring); writes the JSON to `out_path` when given.

    `settings` default: `BenchSettings()` (200 trees depth 6 on 30 features, the sweep 1..64, 256-row requests).

    `workdir` keeps the repository and Triton's log (default: a temporary folder, removed afterwards).
    Triton and the load-generator processes are stopped before this returns, also on errors.
    """
    with tempfile.TemporaryDirectory(prefix="treeops-bench-") as scratch:
        work = Path(workdir) if workdir is not None else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        result = _run(settings if settings is not None else BenchSettings(), work)
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        log.info("wrote %s", out_path)
    return result


def _run(settings: BenchSettings, work: Path) -> BenchResult:
    s = settings
    rows = synthetic_rows(max(4096, s.batch_rows * 2), s.model.features, s.model.seed + 3)
    with serve_bench_model(s, work) as (server, parity_diff, booster):
        version_dir = work / "model_repository" / BENCH_MODEL / "1"
        compiled = version_dir / COMPILED_FILE if s.runtime != "onnxruntime" else None
        floors = measure_floors(version_dir / "model.onnx", booster, rows, s.batch_rows, s.floor_repeats,
                                compiled=compiled)
        log.info("floors: %s", ", ".join(f"{f.runtime} {f.rows} rows {f.p50_us:.1f} us" for f in floors))
        url = server.settings.grpc_url
        check_served_scores(url, rows[: s.batch_rows], RUNTIME_TARGETS[s.runtime]().scorer(version_dir))
        single, batch = infer_payloads(rows, 1), infer_payloads(rows, s.batch_rows)
        live = [service_pb2.ServerLiveRequest().SerializeToString()]
        payload_sets = {
            "single": (single, response_size(url, INFER_METHOD, single[0])),
            "batch": (batch, response_size(url, INFER_METHOD, batch[0])),
            "live": (live, response_size(url, LIVE_METHOD, live[0])),
        }
        observe = Observer(url, server.pid, BENCH_MODEL)
        try:
            with LoadGenerator(url, payload_sets, s.client_processes, s.connections, observe) as generator:
                def sequential(name: str, method: str, payloads: list[bytes], n: int, rows_per_request: int) -> Step:
                    sequential_latency(url, method, payloads, s.warmup_requests)
                    cpu0, before = observe.sample()
                    start = time.perf_counter()
                    samples, client_cpu_s = sequential_latency(url, method, payloads, n)
                    elapsed = time.perf_counter() - start
                    cpu1, after = observe.sample()
                    return _logged(make_step(name, "grpc", 1, rows_per_request, samples, 0, elapsed, client_cpu_s,
                                             cpu1 - cpu0, stats_diff(before, after)), [])

                def closed(name: str, client: Client, method: str, key: str, conc: int, rows_per_request: int) -> Step:
                    r = generator.run(client, method, key, conc, s.warmup_s, s.step_s)
                    stats = stats_diff(*r["stats"]) if "stats" in r else None
                    return _logged(make_step(name, client, conc, rows_per_request, r["latencies_ns"],
                                             len(r["failures"]), s.step_s, r["cpu_s"], r.get("server_cpu_s", 0.0),
                                             stats), r["failures"])

                health = sequential("health", LIVE_METHOD, live, s.health_requests, 0)
                seq = sequential("sequential", INFER_METHOD, single, s.sequential_requests, 1)
                sweep = [closed(f"single c{c}", s.client, INFER_METHOD, "single", c, 1) for c in s.concurrency]
                big = closed(f"batch {s.batch_rows}", s.client, INFER_METHOD, "batch", s.batch_concurrency,
                             s.batch_rows)
                top = max(s.concurrency)
                health_loaded = closed(f"health c{top}", s.client, LIVE_METHOD, "live", top, 0)
                reference = None
                if s.reference_client and s.client != "grpc-aio":
                    reference = closed(f"single c{top}", "grpc-aio", INFER_METHOD, "single", top, 1)
        finally:
            observe.close()
        command = [str(a) for a in server.command]
    return BenchResult(s, floors, health, seq, sweep, big, health_loaded, reference, os.cpu_count() or 1, command,
                       parity_diff)


def _logged(step: Step, failures: list[str]) -> Step:
    if failures:
        log.warning("%s: %d failed requests, first: %s", step.name, len(failures), failures[0])
    log.info("%s", _step_line(step))
    return step


def check_served_scores(url: str, x: np.ndarray, score: Callable[[np.ndarray], np.ndarray]) -> None:
    """Triton's answers for 1 and for len(x) rows equal the served runtime's in-process answers bit for bit."""
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(INFER_METHOD)
        for n in sorted({1, len(x)}):
            rows = np.ascontiguousarray(x[:n], dtype=np.float32)
            got = decode_outputs(call(infer_payloads(rows, n, count=1)[0]))
            expected = score(rows)
            if got.shape != expected.shape or not np.array_equal(got.view(np.uint32), expected.view(np.uint32)):
                raise RequestFailedError(f"Triton's scores for {n} rows differ from the runtime's in-process scores "
                                         f"(max difference {np.nanmax(np.abs(got - expected)):.3g})")
