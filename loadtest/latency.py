"""Sequential single-request latency over gRPC: the scoring call and the bare health round trip."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import tritonclient.grpc as grpcclient

from server.client import ScoringClient


@dataclass(frozen=True)
class LatencyStats:
    """Percentiles in microseconds over `requests` sequential calls."""

    requests: int
    p50_us: float
    p99_us: float
    mean_us: float

    def to_dict(self) -> dict:
        return asdict(self)


def _stats(samples_ns: list[int]) -> LatencyStats:
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return LatencyStats(len(us), float(np.percentile(us, 50)), float(np.percentile(us, 99)), float(us.mean()))


def scoring_latency(client: ScoringClient, feeds: Mapping[str, np.ndarray], requests: int = 1000,
                    warmup: int = 50) -> LatencyStats:
    """Score one row per request, sequentially, cycling through the rows of `feeds` (inputs by name)."""
    n = len(next(iter(feeds.values())))
    single = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)]
    for i in range(warmup):
        client.score_inputs(single[i % n])
    samples = []
    for i in range(requests):
        start = time.perf_counter_ns()
        client.score_inputs(single[i % n])
        samples.append(time.perf_counter_ns() - start)
    return _stats(samples)


def health_latency(url: str, requests: int = 1000, warmup: int = 50) -> LatencyStats:
    """The bare gRPC round trip to Triton (`ServerLive`), the floor any scoring call pays."""
    client = grpcclient.InferenceServerClient(url)
    try:
        for _ in range(warmup):
            client.is_server_live()
        samples = []
        for _ in range(requests):
            start = time.perf_counter_ns()
            client.is_server_live()
            samples.append(time.perf_counter_ns() - start)
    finally:
        client.close()
    return _stats(samples)
