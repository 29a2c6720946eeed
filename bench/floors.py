"""In-process floors: the served runtime and its alternatives timed in this process, 1 thread, same rows."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import Floor
from export.compiled_forest import compiled_scorer
from export.onnx_convert import serving_session


def measure_floors(model_path: Path, booster: Any, rows: np.ndarray, batch_rows: int, repeats: int,
                   compiled: Path | None = None) -> list[Floor]:
    """Median time of ONNX Runtime (as model.py configures it), xgboost (1 thread) and, given its path, the
    compiled forest, on 1 and `batch_rows` rows."""
    session = serving_session(model_path)
    graph_in, graph_out = session.get_inputs()[0].name, session.get_outputs()[0].name  # the graph's own names
    forest = compiled_scorer(compiled) if compiled is not None else None
    booster = booster.copy()
    booster.set_param({"nthread": 1})
    floors = []
    for n in sorted({1, batch_rows}):
        x = np.ascontiguousarray(rows[:n], dtype=np.float32)
        runs: dict[str, Callable[[], Any]] = {
            "onnxruntime": lambda x=x: session.run([graph_out], {graph_in: x}),
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
