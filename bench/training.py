"""Scale benchmark: generate, compute features and train on N rows; rows/s and peak memory."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from training.features import FRAUD_FEATURES
from training.generate import GenerateSpec, generate_to_file
from training.ingest import load_raw
from training.train import TrainParams, train_model


@dataclass(frozen=True)
class TrainingBenchmark:
    """Figures of one run; `*_rows_per_s` are throughputs, `peak_rss_gib` the process high-water mark."""

    rows: int
    generate_rows_per_s: float
    scan_rows_per_s: float  # baseline: reading the raw columns, no features
    features_rows_per_s: float
    train_rows_per_s: float
    train_s: float
    trees: int
    raw_in_memory_gib: float  # what the raw table would take if materialised once
    peak_rss_gib: float

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"rows                      {self.rows:,}",
            f"generate                  {self.generate_rows_per_s:,.0f} rows/s",
            f"scan raw (baseline)       {self.scan_rows_per_s:,.0f} rows/s",
            f"features (sort + windows) {self.features_rows_per_s:,.0f} rows/s "
            f"({self.scan_rows_per_s / self.features_rows_per_s:.1f}x the scan)",
            f"train ({self.trees} trees)         {self.train_rows_per_s:,.0f} rows/s ({self.train_s:.1f} s, features included)",
            f"raw table in memory       {self.raw_in_memory_gib:.2f} GiB",
            f"peak RSS                  {self.peak_rss_gib:.2f} GiB",
        ]


def run_training_benchmark(rows: int, workdir: Path, seed: int = 7, max_rounds: int = 100) -> TrainingBenchmark:
    """Generate `rows` transactions into `workdir`, then time the scan, the features and training."""
    path = workdir / f"bench_{rows}.parquet"
    t0 = time.perf_counter()
    generate_to_file(GenerateSpec(rows=rows, seed=seed), path)
    t_gen = time.perf_counter() - t0

    raw = load_raw(path, FRAUD_FEATURES.raw_schema, ("is_fraud",))
    t0 = time.perf_counter()
    scanned = raw.collect()
    t_scan = time.perf_counter() - t0
    raw_gib = scanned.estimated_size() / 2**30
    del scanned

    t0 = time.perf_counter()
    computed = FRAUD_FEATURES.compute(raw.sort(list(FRAUD_FEATURES.order_by))).collect()
    t_feat = time.perf_counter() - t0
    del computed

    t0 = time.perf_counter()
    result = train_model(raw, FRAUD_FEATURES, "is_fraud", TrainParams(num_boost_round=max_rounds, seed=seed))
    t_train = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return TrainingBenchmark(
        rows=rows,
        generate_rows_per_s=rows / t_gen,
        scan_rows_per_s=rows / t_scan,
        features_rows_per_s=rows / t_feat,
        train_rows_per_s=rows / t_train,
        train_s=t_train,
        trees=result.booster.num_boosted_rounds(),
        raw_in_memory_gib=raw_gib,
        peak_rss_gib=peak,
    )
