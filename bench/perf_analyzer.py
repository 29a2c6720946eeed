"""NVIDIA perf_analyzer, the field's Triton benchmark client, as a second load generator of the same run.

It is not on PyPI in a usable form here: tritonclient 2.41.0's wheel ships the C++ binary, which
needs Debian's `libb64-0d` and `libcudart.so.12` (the nvidia-cuda-runtime-cu12 wheel; no GPU is
used). `make perf-analyzer` installs both wheels into `<venv>/perf_analyzer` (apart from the venv's
own tritonclient, pinned to another version). It gets real rows, never its default `--input-data
random` (one random tensor reused: a forest scores it 3-5x faster than real rows, since every
row takes one path): one JSON entry per request, the rows as base64 bytes so NaN stays NaN.
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import PerfAnalyzerError
from bench.report import PerfAnalyzerStep
from bench.requests import feature_tensor
from bench.sampling import Observer, stats_diff
from export.signature import ServedSignature

log = logging.getLogger(__name__)

PERF_ANALYZER_ENV = "TREEOPS_PERF_ANALYZER"
#: Where `make perf-analyzer` puts the two wheels (`pip install --no-deps --target`).
INSTALL_DIR = Path(sys.prefix) / "perf_analyzer"
INSTALL_HINT = (f"run `make perf-analyzer` (Debian libb64-0d, and tritonclient==2.41.0's binary with "
                f"nvidia-cuda-runtime-cu12 in {INSTALL_DIR}) or set {PERF_ANALYZER_ENV} to a perf_analyzer binary")
#: Measurement windows per level at most; perf_analyzer reports once its last 3 windows agree within
#: STABILITY_PERCENT (throughput and mean latency). Loose, because the 2 cores are shared with other jobs: at
#: its default of 10 % (and at 20 %) it gave up on a busy machine ("Failed to obtain stable measurement"),
#: leaving no figure at all; when calm, it still stops after 3 windows.
MAX_TRIALS = 6
STABILITY_PERCENT = 100


@dataclass(frozen=True)
class PerfAnalyzer:
    """A perf_analyzer binary and the environment it starts in (LD_LIBRARY_PATH with libcudart.so.12)."""

    binary: Path
    env: dict[str, str]


def find_perf_analyzer(path: Path | None = None) -> tuple[PerfAnalyzer | None, str | None]:
    """The binary at `path`, else $TREEOPS_PERF_ANALYZER, `<venv>/perf_analyzer/bin`, or PATH; checked by starting it.

    Returns (perf_analyzer, None), or (None, why not and how to install it).
    """
    chosen = path or os.environ.get(PERF_ANALYZER_ENV)
    candidates = [Path(chosen)] if chosen else [INSTALL_DIR / "bin" / "perf_analyzer"]
    if not chosen and (on_path := shutil.which("perf_analyzer")):
        candidates.append(Path(on_path))
    binary = next((c for c in candidates if c.is_file()), None)
    if binary is None:
        return None, f"not found ({', '.join(map(str, candidates))}): {INSTALL_HINT}"
    env = dict(os.environ)
    libs = [str(d) for d in (binary.parent.parent / "nvidia" / "cuda_runtime" / "lib",
                             INSTALL_DIR / "nvidia" / "cuda_runtime" / "lib") if d.is_dir()]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])]))
    try:
        done = subprocess.run([str(binary), "--help"], env=env, capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return None, f"{binary} cannot run ({exc}): {INSTALL_HINT}"
    if "error while loading shared libraries" in done.stderr:
        return None, f"{binary} cannot start: {done.stderr.strip().splitlines()[-1]}; {INSTALL_HINT}"
    return PerfAnalyzer(binary, env), None


def write_input_data(path: Path, signature: ServedSignature, rows: np.ndarray, count: int) -> Path:
    """perf_analyzer's `--input-data` file: `count` single-row requests of real rows (it cycles through them)."""
    tensor = feature_tensor(signature, rows.shape[1])
    data = []
    for i in range(count):
        row = np.ascontiguousarray(rows[i % len(rows)], dtype=tensor.numpy_dtype)
        data.append({tensor.name: {"b64": base64.b64encode(row.tobytes()).decode(), "shape": list(tensor.dims)}})
    path.write_text(json.dumps({"data": data}))
    return path


def run_perf_analyzer(pa: PerfAnalyzer, url: str, model: str, input_data: Path, concurrency: int, window_s: float,
                      observe: Observer, workdir: Path) -> PerfAnalyzerStep:
    """One perf_analyzer invocation at `concurrency` over gRPC; PerfAnalyzerError (naming its log) when it fails."""
    report = workdir / f"perf_analyzer_c{concurrency}.csv"
    log_path = report.with_suffix(".log")
    command = [str(pa.binary), "-m", model, "-i", "grpc", "-u", url, "--input-data", str(input_data),
               "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(int(window_s * 1e3)),
               "--max-trials", str(MAX_TRIALS), "--stability-percentage", str(STABILITY_PERCENT), "-f", str(report)]
    report.unlink(missing_ok=True)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, before = observe.sample()
    with open(log_path, "w") as out:
        try:
            done = subprocess.run(command, env=pa.env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=60 + MAX_TRIALS * window_s * 3)
        except subprocess.TimeoutExpired:
            raise PerfAnalyzerError(f"perf_analyzer c{concurrency} did not finish within {60 + MAX_TRIALS * window_s * 3:.0f} s"
                                    f": {_last_line(log_path)}") from None
    cpu1, after = observe.sample()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or not report.is_file():
        log.warning("perf_analyzer c%d output:\n%s", concurrency, log_path.read_text()[-3000:])
        raise PerfAnalyzerError(f"perf_analyzer c{concurrency} exited with code {done.returncode}: "
                                f"{_last_line(log_path)} (its output is logged above)")
    row = _report_row(report)
    triton = stats_diff(before, after)
    requests = triton.requests if triton else 0
    client_cpu_s = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    per_request = 1e6 / max(requests, 1)
    return PerfAnalyzerStep(
        concurrency=concurrency, req_per_s=row["Inferences/Second"], p50_us=row["p50 latency"],
        p90_us=row["p90 latency"], p99_us=row["p99 latency"], requests=requests,
        client_cpu_us_per_req=client_cpu_s * per_request, server_cpu_us_per_req=(cpu1 - cpu0) * per_request,
        triton=triton,
    )


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _report_row(path: Path) -> dict[str, float]:
    """The one data row of perf_analyzer's `-f` CSV report (latencies in us)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    wanted = ("Inferences/Second", "p50 latency", "p90 latency", "p99 latency")
    if len(rows) != 1 or any(k not in rows[0] for k in wanted):
        raise PerfAnalyzerError(f"{path}: expected one row with columns {', '.join(wanted)}; perf_analyzer's report "
                                "format changed? This module reads tritonclient 2.41.0's")
    return {k: float(rows[0][k]) for k in wanted}
