"""One measured step of the serving benchmark, sequential or closed-loop, with the server sampled at its two ends."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from bench.loadgen import LoadGenerator
from bench.report import Step, make_step, step_line
from bench.requests import sequential_latency
from bench.sampling import Observer, stats_diff
from bench.settings import Client

log = logging.getLogger(__name__)


def sequential_step(name: str, url: str, method: str, warmup: Sequence[bytes], payloads: Sequence[bytes], requests: int,
                    rows_per_request: int, observe: Observer) -> Step:
    """`len(warmup)` untimed calls, then `requests` timed blocking calls cycling through `payloads`, one at a time."""
    if warmup:
        sequential_latency(url, method, warmup, len(warmup))
    cpu0, before = observe.sample()
    start = time.perf_counter()
    samples, client_cpu_s = sequential_latency(url, method, payloads, requests)
    elapsed = time.perf_counter() - start
    cpu1, after = observe.sample()
    return logged(make_step(name, "grpc", 1, rows_per_request, samples, 0, elapsed, client_cpu_s, cpu1 - cpu0,
                            stats_diff(before, after)), [])


def closed_step(name: str, generator: LoadGenerator, client: Client, method: str, key: str, concurrency: int,
                rows_per_request: int, warmup_s: float, step_s: float) -> tuple[Step, int]:
    """A closed loop of `concurrency` calls in flight for `step_s` after `warmup_s`; returns the step and the
    requests sent in all (warm-up and drain included)."""
    r = generator.run(client, method, key, concurrency, warmup_s, step_s)
    stats = stats_diff(*r["stats"]) if "stats" in r else None
    step = make_step(name, client, concurrency, rows_per_request, r["latencies_ns"], len(r["failures"]), step_s,
                     r["cpu_s"], r.get("server_cpu_s", 0.0), stats)
    return logged(step, r["failures"]), r["sent"]


def logged(step: Step, failures: list[str]) -> Step:
    if failures:
        log.warning("%s: %d failed requests, first: %s", step.name, len(failures), failures[0])
    log.info("%s", step_line(step))
    return step
