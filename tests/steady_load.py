"""Steady gRPC load for tests that change what Triton serves: every failure and every answering version kept."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import numpy as np

from server.client import Scores, ScoringClient
from server.errors import ScoringError


class SteadyLoad:
    """Threads scoring single rows without retries, recording failures and answering versions.

    `rows`: feature rows (a feature-tensor model), or one array per input with a row per request (a raw-transaction
    model: `server.client.transaction_feeds` of the transactions to send).
    """

    def __init__(self, url: str, rows: np.ndarray | Mapping[str, np.ndarray], threads: int = 3,
                 model: str = "fraud") -> None:
        self.url, self.rows, self.model = url, rows, model
        self.count = len(next(iter(rows.values()))) if isinstance(rows, Mapping) else len(rows)
        self.stop = threading.Event()
        self.ok, self.failures = 0, []
        self.versions: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, seed: int) -> None:
        with ScoringClient(self.url, self.model, retries=0, timeout_s=5.0) as client:
            i = seed
            while not self.stop.is_set():
                try:
                    scores = self._score(client, i % self.count)
                    with self.lock:
                        self.ok += 1
                        self.versions.append((time.monotonic(), scores.model_version))
                except ScoringError as exc:
                    with self.lock:
                        self.failures.append(str(exc))
                i += 1

    def _score(self, client: ScoringClient, row: int) -> Scores:
        if isinstance(self.rows, Mapping):
            return client.score_inputs({name: column[row : row + 1] for name, column in self.rows.items()})
        return client.score(self.rows[row][None, :])

    def __enter__(self) -> SteadyLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)

    def latest_version(self) -> str:
        with self.lock:
            return self.versions[-1][1]
