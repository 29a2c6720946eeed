"""A forest compiled to C (tl2cgen) with a batch entry point, for the Python backend's "compiled" runtime.

`predict_rows(const float* x, int64_t rows, float* out)` writes `treeops_width()` floats per row
(binary: {1 - p, p}); each row is computed alone, so its bits never depend on the batch.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import xgboost as xgb

from export.errors import ExportError

COMPILED_FILE = "forest.so"

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
int treeops_width(void) { return TREEOPS_WIDTH; }
int treeops_n_features(void) { return TREEOPS_N_FEATURES; }
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
    require_compiler(cc)
    from export.booster import legacy_xgboost_json, n_outputs, probability_booster, task_of

    width = n_outputs(booster)
    with tempfile.TemporaryDirectory(prefix="treeops-forest-") as scratch, _stdout_to_stderr():
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
            run_compiler([cc, *flags, "-c", str(c_file), "-o", str(obj)])
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(build, sources))
        run_compiler([cc, "-shared", "-o", str(out_path), *map(str, objects), "-lm"])
    return out_path


def compiled_scorer(path: Path, width: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Score rows with the compiled forest at `path`, exactly as model.py's "compiled" runtime does.

    A private copy is loaded: a loaded library stays mapped for the life of the process, and a
    repository file rewritten in place later would otherwise crash this process (SIGBUS).
    """
    with tempfile.TemporaryDirectory(prefix="treeops-scorer-") as scratch:
        private = Path(scratch) / Path(path).name
        shutil.copyfile(path, private)
        library = ctypes.CDLL(str(private))
    width = width if width is not None else library.treeops_width()
    predict = library.predict_rows
    predict.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    predict.restype = None

    def score(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], width), np.float32)
        predict(x.ctypes.data, x.shape[0], out.ctypes.data)
        return out

    return score


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what treelite and tl2cgen print (Python prints and their C++ loggers) to stderr, so that
    stdout keeps only a command's own output (`treeops ... --json`)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def require_compiler(cc: str) -> None:
    """Fail early, with the fix, where the C compiler the compiled targets need is missing."""
    if shutil.which(cc) is None:
        raise ExportError(f"the compiled targets need a C compiler: {cc!r} is not on PATH (apt-get install gcc)")


def run_compiler(command: list[str]) -> None:
    """Run one compiler command; its stderr tail becomes an ExportError."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ExportError(f"{command[0]} failed building {command[command.index('-o') + 1]}: {done.stderr[-2000:]}")
