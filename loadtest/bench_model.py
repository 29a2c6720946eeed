"""The serving benchmark's own model: a seeded synthetic xgboost forest exported like production.

Kept apart from `bench.py` so tests and experiments can build and export the same model without
starting a server. The export goes through the real target (`PythonOnnxTarget`), the parity gate
on the written artifact, and `ModelRepository.write_config`, so the benchmark measures exactly
what `treeops export` would serve.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import xgboost as xgb

from export.errors import ExportError
from export.parity import ParityReport, check_parity, gate_rows, require
from export.repository import ModelRepository
from export.targets.python_onnx import PythonOnnxTarget
from export.triton_config import ServingSettings

log = logging.getLogger(__name__)

BENCH_MODEL = "bench"
COMPILED_FILE = "forest.so"
Runtime = Literal["onnxruntime", "compiled"]


@dataclass(frozen=True)
class BenchModelSpec:
    """Shape of the benchmark forest: `trees` rounds of depth `depth` on `features` float columns.

    `train_rows` seeded rows (label from a noisy non-linear function) are enough to grow
    full-depth trees; there is no early stopping, so the forest has exactly `trees` trees.
    """

    trees: int = 200
    depth: int = 6
    features: int = 30
    train_rows: int = 20_000
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def synthetic_rows(n: int, features: int, seed: int) -> np.ndarray:
    """`n` float32 rows of `features` standard-normal columns with about 2% NaN."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    x[rng.random(x.shape) < 0.02] = np.nan
    return x


def train_bench_model(spec: BenchModelSpec = BenchModelSpec()) -> xgb.Booster:
    """Train the binary:logistic forest of `spec` (1 thread, so the result does not depend on the machine)."""
    x = synthetic_rows(spec.train_rows, spec.features, spec.seed)
    rng = np.random.default_rng(spec.seed + 1)
    z = np.nan_to_num(x)
    k = min(spec.features, 6)
    logit = z[:, :k] @ rng.normal(size=k) + np.sin(3 * z[:, 0]) * z[:, 1 % spec.features] + rng.normal(size=len(z))
    y = (logit > 0).astype(np.float32)
    params = {"objective": "binary:logistic", "max_depth": spec.depth, "eta": 0.1, "nthread": 1,
              "tree_method": "hist", "seed": spec.seed}
    return xgb.train(params, xgb.DMatrix(x, label=y, missing=np.nan), num_boost_round=spec.trees)


def export_bench_model(
    booster: xgb.Booster,
    n_features: int,
    root: Path,
    serving: ServingSettings,
    *,
    model_name: str = BENCH_MODEL,
    version: int = 1,
    seed: int = 0,
    runtime: Runtime = "onnxruntime",
) -> ParityReport:
    """Write `booster` as `<root>/<model_name>/<version>` with the python-onnx target and its config.

    `runtime="compiled"` adds `forest.so` (`compile_forest`) and selects it in the config; the
    parity gate then scores that library. The artifact must pass the export parity gate
    (`check_parity` on held-out-like, edge and property rows), exactly as `treeops export`
    requires; ParityError otherwise.
    """
    target = PythonOnnxTarget()
    repository = ModelRepository(root)
    width = target.n_outputs(booster)
    rows = gate_rows(booster, synthetic_rows(500, n_features, seed + 2), n_property=500, seed=seed)
    with repository.stage_version(model_name, version) as staging:
        target.write_artifacts(booster, n_features, staging)
        scorer = target.scorer(staging)
        if runtime == "compiled":
            compile_forest(booster, n_features, staging / COMPILED_FILE)
            scorer = compiled_scorer(staging / COMPILED_FILE, width)
        report = check_parity(booster, scorer, rows)
        require(report, f"benchmark model {model_name} version {version} ({runtime})")
    parameters = {"runtime": runtime} if runtime != "onnxruntime" else {}
    repository.write_config(target.model_config(model_name, n_features, width, serving, [version], parameters))
    log.info("benchmark model written to %s (parity max diff %.2g)", repository.version_dir(model_name, version),
             report.max_abs_diff)
    return report


_BATCH_ENTRY = r"""
#include "header.h"
/* treeops: score `rows` dense float32 rows (NaN = missing) into `out`, TREEOPS_WIDTH floats per row. */
void predict_rows(const float* x, int64_t rows, float* out) {
  union Entry entry[TREEOPS_N_FEATURES];
  float result[N_TARGET * MAX_N_CLASS];
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = x + i * TREEOPS_N_FEATURES;
    for (int j = 0; j < TREEOPS_N_FEATURES; ++j) {
      if (isnan(row[j])) entry[j].missing = -1; else entry[j].fvalue = row[j];
    }
    for (int k = 0; k < N_TARGET * MAX_N_CLASS; ++k) result[k] = 0.0f;
    predict(entry, 0, result);
#if TREEOPS_BINARY
    out[2 * i] = 1.0f - result[0];
    out[2 * i + 1] = result[0];
#else
    for (int k = 0; k < TREEOPS_WIDTH; ++k) out[i * TREEOPS_WIDTH + k] = result[k];
#endif
  }
}
"""


def compile_forest(booster: xgb.Booster, n_features: int, out_path: Path, *, cc: str = "gcc") -> Path:
    """Compile `booster` to a shared library with tl2cgen + `cc`, exporting `predict_rows` (see model.py).

    Binary models write {1 - p, p} per row (the served width 2), others their num_class values.
    Needs `tl2cgen` and `treelite` (4.3 reads the legacy JSON the fil target writes) and a C compiler;
    the library is for the machine's architecture. Translation units compile in parallel.
    """
    try:
        import tl2cgen
        import treelite
    except ImportError as exc:
        raise ExportError(f"the compiled runtime needs tl2cgen and treelite: pip install tl2cgen==1.0.0 ({exc})") from exc
    if shutil.which(cc) is None:
        raise ExportError(f"the compiled runtime needs a C compiler: {cc!r} is not on PATH (apt-get install gcc)")
    from export.onnx_convert import n_outputs, probability_booster, task_of
    from export.targets.fil import legacy_xgboost_json

    width = n_outputs(booster)
    with tempfile.TemporaryDirectory(prefix="treeops-forest-") as scratch:
        src = Path(scratch)
        (src / "model.json").write_text(json.dumps(legacy_xgboost_json(probability_booster(booster))))
        model = treelite.frontend.load_xgboost_model(str(src / "model.json"))
        tl2cgen.generate_c_code(model, dirpath=str(src), params={"parallel_comp": max(os.cpu_count() or 1, 2) * 2})
        (src / "treeops_batch.c").write_text(_BATCH_ENTRY)
        flags = ["-O3", "-fPIC", "-std=c99", f"-DTREEOPS_N_FEATURES={n_features}", f"-DTREEOPS_WIDTH={width}",
                 f"-DTREEOPS_BINARY={int(task_of(booster) == 'binary')}"]
        sources = sorted(src.glob("*.c"))

        def build(c_file: Path) -> Path:
            obj = c_file.with_suffix(".o")
            _run([cc, *flags, "-c", str(c_file), "-o", str(obj)])
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(build, sources))
        _run([cc, "-shared", "-o", str(out_path), *map(str, objects), "-lm"])
    return out_path


def compiled_scorer(path: Path, width: int) -> Callable[[np.ndarray], np.ndarray]:
    """Score rows with the compiled forest at `path`, exactly as model.py's "compiled" runtime does."""
    predict = ctypes.CDLL(str(path)).predict_rows
    predict.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    predict.restype = None

    def score(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], width), np.float32)
        predict(x.ctypes.data, x.shape[0], out.ctypes.data)
        return out

    return score


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ExportError(f"compiling the forest failed: {' '.join(command[:3])} ...: {done.stderr[-2000:]}")
