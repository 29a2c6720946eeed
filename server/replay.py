"""Replay a stream of raw transactions through a served raw-transaction model, one transaction per call,
and check every answer against offline features + xgboost.

Like a partitioned stream: each entity's transactions go through one client, in stream order; the
clients run concurrently, so entities interleave at the server. A transaction's expected history is
everything of its entity that arrived before it: the backfilled history (arrival = timestamp order)
and then the stream's earlier rows (arrival = stream order, so late arrivals count as they arrive),
computed by `training.history.as_arrived` from the same declarations the served model reads, with the
spec's late allowance (`FeatureSpec.late_arrival`, which the served store prunes with: a transaction
arriving more than that behind its entity's newest one sees only the part of its window still kept).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl
import xgboost as xgb

from export.parity import ParityReport, check_parity
from server.client import ScoringClient, transaction_feeds
from server.errors import ScoringError
from training.features import FittedFeatures
from training.history import as_arrived

_ARRIVAL = "__arrival"


@dataclass(frozen=True)
class ReplayResult:
    """Served P(positive) per stream row (stream order), each call's latency, and the wall time."""

    probabilities: np.ndarray
    latency_us: np.ndarray
    wall_s: float
    clients: int

    @property
    def rate(self) -> float:
        """Transactions per second over the whole replay."""
        return len(self.probabilities) / self.wall_s if self.wall_s else 0.0


def partitions(stream: pl.DataFrame, entity: str, clients: int) -> list[np.ndarray]:
    """Row indices of each client: entities dealt round-robin in order of first appearance, rows in stream order."""
    if clients < 1:
        raise ScoringError(f"clients must be >= 1, got {clients}")
    values = stream[entity].to_list()
    deal = {v: k % clients for k, v in enumerate(dict.fromkeys(values))}
    client_of = np.array([deal[v] for v in values], dtype=np.int64)
    return [np.flatnonzero(client_of == c) for c in range(clients)]


def replay(url: str, model: str, stream: pl.DataFrame, entity: str, *, clients: int = 8,
           timeout_s: float = 5.0) -> ReplayResult:
    """Score every row of `stream` with its own call from `clients` concurrent ScoringClients (entities
    partitioned between them); the first failure stops the replay and is raised."""
    with ScoringClient(url, model, retries=0, timeout_s=timeout_s) as probe:
        signature = probe.served_signature()
    feeds = transaction_feeds(signature, stream)
    scores = np.full((stream.height, signature.output.dims[-1]), np.nan)
    latency = np.zeros(stream.height)
    errors: list[Exception] = []

    def run(rows: np.ndarray) -> None:
        with ScoringClient(url, model, retries=0, timeout_s=timeout_s, signature=signature) as client:
            for i in rows:
                if errors:
                    return
                one: Mapping[str, np.ndarray] = {k: v[i : i + 1] for k, v in feeds.items()}
                start = time.perf_counter()
                try:
                    scores[i] = client.score_inputs(one).probabilities[0]
                except Exception as exc:  # raised again by the calling thread
                    errors.append(exc)
                    return
                latency[i] = (time.perf_counter() - start) * 1e6

    threads = [threading.Thread(target=run, args=(rows,), daemon=True) for rows in partitions(stream, entity, clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return ReplayResult(scores[:, -1], latency, wall, clients)


def offline_matrix(fitted: FittedFeatures, history: pl.DataFrame, stream: pl.DataFrame) -> np.ndarray:
    """The encoded features of each stream row given `history` (arrived first, in timestamp order) and the
    stream's earlier rows (arrived in stream order), for a store with the spec's late allowance.

    A stream in timestamp order arrives as training assumes (the allowance then removes nothing), so the
    spec's own Polars expressions give its features; any other order goes through the arrival-order
    reference (`as_arrived`, slower).
    """
    raw = list(fitted.spec.raw_schema)
    times = sorted({f.history.time for f in fitted.spec.features if f.history is not None})
    frame = pl.concat([history.select(raw).sort(times), stream.select(raw)]).with_row_index(_ARRIVAL)
    if all(frame[t].is_sorted() for t in times):
        computed = fitted.spec.compute(frame.lazy()).collect()
    else:
        computed = as_arrived(frame, fitted.spec.features, _ARRIVAL, late_us=fitted.spec.late_arrival_us)
    return fitted.matrix(computed.tail(stream.height))


def replay_parity(booster: xgb.Booster, fitted: FittedFeatures, history: pl.DataFrame, stream: pl.DataFrame,
                  served: np.ndarray, *, tolerance: float = 1e-5) -> ParityReport:
    """The parity gate's comparison of the served P(positive) per stream row with xgboost on offline features
    (with `fitted`'s late allowance, the one the served store prunes with)."""
    x = offline_matrix(fitted, history, stream)
    return check_parity(booster, lambda _: served.reshape(-1, 1), x, tolerance=tolerance)
