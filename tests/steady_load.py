"""Steady gRPC load for tests that change what Triton serves: every failure and every answering version kept."""

from __future__ import annotations

import threading
import time

import numpy as np

from server.client import ScoringClient
from server.errors import ScoringError


class SteadyLoad:
    """Threads scoring single rows without retries, recording failures and answering versions."""

    def __init__(self, url: str, rows: np.ndarray, threads: int = 3, model: str = "fraud") -> None:
        self.url, self.rows, self.model = url, rows, model
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
                    scores = client.score(self.rows[i % len(self.rows)][None, :])
                    with self.lock:
                        self.ok += 1
                        self.versions.append((time.monotonic(), scores.model_version))
                except ScoringError as exc:
                    with self.lock:
                        self.failures.append(str(exc))
                i += 1

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
