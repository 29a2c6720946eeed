"""What the server spent: CPU seconds of its process group (/proc) and Triton's cumulative statistics of one model."""

from __future__ import annotations

import os
from typing import Any

import tritonclient.grpc as grpcclient

from bench.report import TritonStats


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

