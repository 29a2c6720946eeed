"""Serving benchmark: a real Triton serving a 200-tree forest, measured against in-process floors of the same run.

One run (`run_serving_benchmark`):
1. trains the benchmark forest (bench.model) and exports it through the chosen export target
   (default: native-compiled), parity gate included, into a temporary repository; every request is
   built from the signature in the exported config.pbtxt (export.signature.ServedSignature);
2. measures the in-process floor: ONNX Runtime (configured as model.py configures it), xgboost
   `inplace_predict` (1 thread) and, for the compiled targets, the tl2cgen forest, on 1 and on
   `batch_rows` rows (bench.floors);
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
     a usual Python client costs;
   - single rows at each `perf_analyzer_concurrency` with NVIDIA perf_analyzer (bench.perf_analyzer),
     the client the field reports Triton figures with, when it is installed;
   - with `settings.raw` (the default), right after the two sequential steps (so their ratios share the
     machine's conditions): the raw-transaction path on the same Triton (bench.online), the fraud model on raw
     fields with its history in a Redis of the run: backfill rows/s (measured before Triton starts), a bare Redis
     round trip, single transactions sequential and at 32 in flight;
   - with `settings.prediction_log == "both"`: a second tritonserver serving the same model files with the
     prediction log on, and in `log_rounds` rounds (which server goes first alternates) the bare round trip, single
     rows sequential and at `log_concurrency` in flight on each server; then the rows its log holds are counted
     (monitoring.prediction_log.read_window) against the requests it was sent;
4. reports it all in one table and checks it against bench/targets.toml (bench.report).

Load generators: on a 2-core machine the client shares the CPUs with the server, so its cost
decides what can be measured. The sweep uses a minimal HTTP/2 gRPC client (bench.h2, about 10-20 us
of CPU per call; grpc.aio: 100-150 us), in one or more processes (bench.loadgen); CPU seconds and
Triton's statistics are sampled at each step's ends (bench.sampling).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from bench.errors import PerfAnalyzerError, RequestFailedError
from bench.floors import measure_floors
from bench.loadgen import LoadGenerator
from bench.model import BENCH_MODEL, BENCH_TARGETS, export_bench_model, synthetic_rows, train_bench_model
from bench.online import RawModel, measure_raw_path, prepare_raw_model
from bench.perf_analyzer import find_perf_analyzer, run_perf_analyzer, write_input_data
from bench.report import BenchResult, LogCost, LogSide, PerfAnalyzerStep, Step
from bench.requests import INFER_METHOD, LIVE_METHOD, PAYLOADS, decode_outputs, infer_payloads, response_size
from bench.sampling import Observer
from bench.settings import BenchSettings, Client
from bench.steps import closed_step, sequential_step
from export.compiled_forest import COMPILED_FILE
from export.repository import ModelRepository
from export.signature import ServedSignature
from export.triton_config import parse
from monitoring.prediction_log import read_window
from server.installation import find_triton
from server.launcher import TritonServer, free_port
from server.settings import TritonSettings

log = logging.getLogger(__name__)


@contextmanager
def serve_bench_model(settings: BenchSettings, workdir: Path,
                      raw: RawModel | None = None) -> Iterator[tuple[TritonServer, float, Any, ServedSignature]]:
    """Train, export (parity-gated) and serve the benchmark model; yields the server, parity diff, booster and
    the signature of the exported config (what every request is built from).

    `raw`: a raw-transaction model already exported into the same repository (bench.online), served beside it with
    its store URL given to tritonserver. The server is stopped (process group killed) when the block exits.
    """
    booster = train_bench_model(settings.model)
    root = workdir / "model_repository"
    shutil.rmtree(root / BENCH_MODEL, ignore_errors=True)
    report = export_bench_model(booster, settings.model.features, root, settings.serving, seed=settings.model.seed,
                                target=settings.target)
    config = parse(ModelRepository(root).read_config(BENCH_MODEL) or "", f"{root / BENCH_MODEL}/config.pbtxt")
    signature = ServedSignature.from_config(config)
    if settings.model_source is not None:
        shutil.copyfile(settings.model_source, root / BENCH_MODEL / "1" / "model.py")
    models = (BENCH_MODEL, raw.name) if raw else (BENCH_MODEL,)
    log_dir = workdir / "prediction_log" if settings.prediction_log == "on" else None
    with _triton(settings, workdir, models, "triton.log", raw.store_url if raw else None, log_dir) as server:
        yield server, report.max_abs_diff, booster, signature


@contextmanager
def _triton(settings: BenchSettings, workdir: Path, models: tuple[str, ...], log_name: str, store_url: str | None,
            prediction_log_dir: Path | None) -> Iterator[TritonServer]:
    """A tritonserver on free loopback ports serving `models` of `workdir`/model_repository, with the prediction log
    under `prediction_log_dir` (None: off); stopped (gracefully: the log flushed, then the group killed) on exit."""
    triton = settings.triton.model_copy(update={
        "model_repository": workdir / "model_repository", "model_repository_uri": None, "host": "127.0.0.1",
        "bind_address": "127.0.0.1", "grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port(),
        "model_control_mode": "explicit", "load_models": models, "admin_key": None,
        "insecure_admin": True,  # loopback only, one run: statistics are read without a key
        "grpc_use_ssl": False, "grpc_use_ssl_mutual": False, "backend_directory": None,
        "online_store_url": store_url, "prediction_log_dir": prediction_log_dir,
    })
    server = TritonServer(triton, find_triton(None, workdir / "triton"), workdir / log_name)
    server.start(timeout_s=120, models=models)
    try:
        yield server
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
    with _raw_model(s, work) as raw, serve_bench_model(s, work, raw) as (server, parity_diff, booster, signature):
        version_dir = work / "model_repository" / BENCH_MODEL / "1"
        compiled = version_dir / COMPILED_FILE if s.target != "python-onnx" else None
        floors = measure_floors(version_dir / "model.onnx", booster, rows, s.batch_rows, s.floor_repeats,
                                compiled=compiled)
        log.info("floors: %s", ", ".join(f"{f.runtime} {f.rows} rows {f.p50_us:.1f} us" for f in floors))
        url = server.settings.grpc_url
        check_served_scores(url, signature, rows[: s.batch_rows], BENCH_TARGETS[s.target]().scorer(version_dir))
        single, batch = infer_payloads(signature, rows, 1), infer_payloads(signature, rows, s.batch_rows)
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
                    warmup = [payloads[i % len(payloads)] for i in range(s.warmup_requests)]
                    return sequential_step(name, url, method, warmup, payloads, n, rows_per_request, observe)

                def closed(name: str, client: Client, method: str, key: str, conc: int, rows_per_request: int) -> Step:
                    return closed_step(name, generator, client, method, key, conc, rows_per_request, s.warmup_s,
                                       s.step_s)[0]

                health = sequential("health", LIVE_METHOD, live, s.health_requests, 0)
                seq = sequential("sequential", INFER_METHOD, single, s.sequential_requests, 1)
                raw_path = None
                if raw is not None:  # right after the sequential references, so their ratios share conditions
                    raw_path = measure_raw_path(s.raw, raw, url, server.pid, sequential_requests=s.sequential_requests,
                                                warmup_requests=s.warmup_requests, warmup_s=s.warmup_s, step_s=s.step_s)
                sweep = [closed(f"single c{c}", s.client, INFER_METHOD, "single", c, 1) for c in s.concurrency]
                big = closed(f"batch {s.batch_rows}", s.client, INFER_METHOD, "batch", s.batch_concurrency,
                             s.batch_rows)
                top = max(s.concurrency)
                health_loaded = closed(f"health c{top}", s.client, LIVE_METHOD, "live", top, 0)
                reference = None
                if s.reference_client and s.client != "grpc-aio":
                    reference = closed(f"single c{top}", "grpc-aio", INFER_METHOD, "single", top, 1)
                log_cost = None
                if s.prediction_log == "both":
                    off = _Side(url, generator, observe)
                    log_cost = _measure_log_cost(s, work, server.settings, off, single, live)
            perf, perf_note = _perf_analyzer_steps(s, url, signature, rows, observe, work)
        finally:
            observe.close()
        command = [str(a) for a in server.command]
    return BenchResult(s, floors, health, seq, sweep, big, health_loaded, reference, os.cpu_count() or 1, command,
                       parity_diff, perf, perf_note, raw_path, log_cost)


@dataclass(frozen=True)
class _Side:
    """One server of the prediction-log comparison and what drives and samples it."""

    url: str
    generator: LoadGenerator
    observe: Observer


def _measure_log_cost(s: BenchSettings, work: Path, served: TritonSettings, off: _Side, single: list[bytes],
                      live: list[bytes]) -> LogCost:
    """The log's cost: a second Triton like `served` (same repository, models and store) with the prediction log on;
    `s.log_rounds` rounds, each step run on both servers back to back, the first server alternating between rounds;
    then the "on" server is stopped (its log flushed) and its logged rows are counted."""
    log_dir = work / "prediction_log_on"
    shutil.rmtree(log_dir, ignore_errors=True)
    start = dt.datetime.now(dt.UTC)
    with _triton(s, work, served.load_models, "triton-log-on.log", served.online_store_url, log_dir) as on_server:
        url = on_server.settings.grpc_url
        payload_sets = {"single": (single, response_size(url, INFER_METHOD, single[0])),
                        "live": (live, response_size(url, LIVE_METHOD, live[0]))}
        observe = Observer(url, on_server.pid, BENCH_MODEL)
        try:
            with LoadGenerator(url, payload_sets, s.client_processes, s.connections, observe) as generator:
                on = _Side(url, generator, observe)
                steps: dict[str, dict[str, list[Step]]] = {"off": {}, "on": {}}
                sent = 1  # response_size's probe of the single-row payload
                warmup = [single[i % len(single)] for i in range(s.warmup_requests)]
                for r in range(s.log_rounds):
                    order = [("off", off), ("on", on)] if r % 2 == 0 else [("on", on), ("off", off)]
                    for kind in ("health", "sequential", "loaded"):
                        for label, side in order:
                            name = f"log {label} {kind}"
                            if kind == "health":
                                step = sequential_step(name, side.url, LIVE_METHOD, live[:1] * s.warmup_requests,
                                                       live, s.health_requests, 0, side.observe)
                            elif kind == "sequential":
                                step = sequential_step(name, side.url, INFER_METHOD, warmup, single,
                                                       s.sequential_requests, 1, side.observe)
                                sent += (len(warmup) + s.sequential_requests) * (label == "on")
                            else:
                                step, n = closed_step(f"log {label} c{s.log_concurrency}", side.generator, s.client,
                                                      INFER_METHOD, "single", s.log_concurrency, 1, s.warmup_s,
                                                      s.step_s)
                                sent += n * (label == "on")
                            steps[label].setdefault(kind, []).append(step)
        finally:
            observe.close()
    logged = read_window(log_dir, BENCH_MODEL, start, dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)).height
    log.info("prediction log: %d rows logged of %d requests sent to the log-on server", logged, sent)
    return LogCost(s.log_rounds, s.log_concurrency, LogSide(**steps["off"]), LogSide(**steps["on"]), sent, logged)


def _raw_model(s: BenchSettings, work: Path) -> AbstractContextManager[RawModel | None]:
    """The raw-transaction model of the run, exported into the benchmark's repository (None: not asked for)."""
    if s.raw is None:
        return nullcontext()
    return prepare_raw_model(s.raw, s.serving, work / "model_repository", work / "raw")


def _perf_analyzer_steps(s: BenchSettings, url: str, signature: ServedSignature, rows: np.ndarray,
                         observe: Observer, work: Path) -> tuple[list[PerfAnalyzerStep], str | None]:
    """perf_analyzer at each of `s.perf_analyzer_concurrency`; without it (or when it fails) a note saying why."""
    if not s.perf_analyzer:
        return [], None
    pa, note = find_perf_analyzer(s.perf_analyzer_path)
    if pa is None:
        log.warning("perf_analyzer %s", note)
        return [], note
    input_data = write_input_data(work / "perf_analyzer_input.json", signature, rows, PAYLOADS)
    steps = []
    for c in s.perf_analyzer_concurrency:
        try:
            steps.append(run_perf_analyzer(pa, url, BENCH_MODEL, input_data, c, s.step_s, observe, work))
        except PerfAnalyzerError as exc:
            log.warning("%s", exc)
            return steps, str(exc)
        log.info("perf_analyzer c%d: %.0f req/s, p50 %.0f us, p99 %.0f us", c, steps[-1].req_per_s,
                 steps[-1].p50_us, steps[-1].p99_us)
    return steps, None


def check_served_scores(url: str, signature: ServedSignature, x: np.ndarray,
                        score: Callable[[np.ndarray], np.ndarray]) -> None:
    """Triton's answers for 1 and for len(x) rows equal the served runtime's in-process answers bit for bit."""
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(INFER_METHOD)
        for n in sorted({1, len(x)}):
            rows = np.ascontiguousarray(x[:n], dtype=np.float32)
            got = decode_outputs(signature, call(infer_payloads(signature, rows, n, count=1)[0]))
            expected = score(rows)
            if got.shape != expected.shape or not np.array_equal(got.view(np.uint32), expected.view(np.uint32)):
                raise RequestFailedError(f"Triton's scores for {n} rows differ from the runtime's in-process scores "
                                         f"(max difference {np.nanmax(np.abs(got - expected)):.3g})")
