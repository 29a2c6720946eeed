"""`treeops bench monitor`: the `treeops monitor` job over N logged predictions (default 1M) in one window.

Setup (not timed): a forest trained on generated transactions with its reference written as export writes it,
N generated transactions scored by it and logged through the serving path's prediction-log writer, and labels
for a share of them ingested. Timed: `run_monitor` end to end, as the command runs it (read the window, join the
labels, drift and quality reports, the Evidently workspace, the gauges).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import xgboost as xgb

from backends.prediction_log import DIR_ENV, MAX_BYTES_ENV, RING_SIZE_ENV, PredictionLog, Settings
from monitoring.labels import ingest_labels
from monitoring.monitor import MonitorPaths, run_monitor
from monitoring.reference import write_reference
from training.features import FRAUD_FEATURES
from training.generate import GenerateSpec, generate_transactions

MODEL = "fraud"
VERSION = 1
END = dt.datetime(2026, 3, 1, 13, tzinfo=dt.UTC)


@dataclass(frozen=True)
class MonitorBenchmark:
    rows: int
    labelled: int
    setup_s: float
    labels_s: float
    monitor_s: float
    exit_code: int
    folder: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def lines(self) -> list[str]:
        return [f"treeops monitor over {self.rows:,} logged predictions ({self.labelled:,} labelled): "
                f"{self.monitor_s:.1f} s ({self.rows / self.monitor_s:,.0f} predictions/s), exit {self.exit_code}",
                f"labels ingest: {self.labels_s:.1f} s; setup (train, score, write the log): {self.setup_s:.1f} s",
                f"reports: {self.folder}"]


def log_predictions(root: Path, features: list[str], matrix: np.ndarray, scores: np.ndarray, ids: Sequence[str], *,
                    version: int = VERSION, model: str = MODEL, end: dt.datetime = END,
                    window: dt.timedelta = dt.timedelta(hours=1), rows_per_request: int = 100,
                    failed: int = 0) -> None:
    """Log the scored rows through the serving path's writer (backends/prediction_log.py) into `root`, as requests
    of `rows_per_request` rows arriving evenly over the window before `end`; the last `failed` rows are logged as
    failed requests (an error, no score or features)."""
    settings = Settings({DIR_ENV: str(root), RING_SIZE_ENV: str(len(ids) + 1), MAX_BYTES_ENV: str(2**40)})
    writer = PredictionLog(settings, model, version, features)
    n = len(ids)
    start_us = int((end - window).timestamp() * 1_000_000)
    step_us = window // dt.timedelta(microseconds=1) // max(n, 1)
    ids = np.asarray(ids, dtype=object)
    for first, last, ok in ((0, n - failed, True), (n - failed, n, False)):
        for lo in range(first, last, rows_per_request):
            hi, arrival = min(lo + rows_per_request, last), start_us + lo * step_us
            if ok:
                writer.append(f"bench-{lo}", arrival, score=scores[lo:hi], features=matrix[lo:hi],
                              transaction_id=ids[lo:hi])
            else:
                writer.append(f"bench-{lo}", arrival, transaction_id=ids[lo:hi], error="deadline exceeded")
    writer.close(timeout_s=600)


def run_monitor_benchmark(rows: int, workdir: Path, *, labelled_share: float = 0.5, train_rows: int = 200_000,
                          seed: int = 7) -> MonitorBenchmark:
    """Set up a workspace in `workdir` (emptied first) with `rows` logged predictions in the hour before END, then
    time the job."""
    shutil.rmtree(workdir, ignore_errors=True)
    started = time.perf_counter()
    spec = FRAUD_FEATURES
    train = generate_transactions(GenerateSpec(rows=train_rows, seed=seed))
    fitted = spec.fit(spec.compute(train.lazy()))
    x = fitted.matrix_raw(train)
    y = train["is_fraud"].cast(pl.Float32).to_numpy()
    fit = int(len(y) * 0.8)  # the last fifth is the holdout the reference describes
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 6, "nthread": os.cpu_count() or 1},
                        xgb.DMatrix(x[:fit], label=y[:fit]), num_boost_round=50)
    paths = MonitorPaths.in_workspace(workdir, MODEL)
    version_dir = paths.model_repository / MODEL / str(VERSION)
    version_dir.mkdir(parents=True, exist_ok=True)
    write_reference(version_dir, spec.names, spec.categorical, x[fit:], y[fit:], booster.inplace_predict(x[fit:]),
                    threshold=0.5)

    raw = generate_transactions(GenerateSpec(rows=rows, seed=seed + 1))
    served = fitted.matrix_raw(raw)
    ids = raw["transaction_id"].cast(pl.String)
    log_predictions(paths.log_root, spec.names, served, booster.inplace_predict(served), ids.to_list())
    labelled = int(rows * labelled_share)
    labels_file = workdir / "labels.parquet"
    pl.DataFrame({"transaction_id": ids.head(labelled), "label": raw["is_fraud"].head(labelled).cast(pl.Int8),
                  "labelled_at": [END] * labelled}).write_parquet(labels_file)
    setup_s = time.perf_counter() - started

    started = time.perf_counter()
    ingest_labels(labels_file, paths.labels_dir, ids)
    labels_s = time.perf_counter() - started

    started = time.perf_counter()
    result = run_monitor(MODEL, END - dt.timedelta(hours=1), END, paths)
    monitor_s = time.perf_counter() - started
    window = result.versions[0]
    return MonitorBenchmark(rows, window.labelled, setup_s, labels_s, monitor_s, result.exit_code, str(window.folder))
