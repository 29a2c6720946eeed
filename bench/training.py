"""Scale benchmarks of both engines: generate, compute features and train on N rows; rows/s and peak memory.

The dask engine's data is generated in a child process, so the client's peak is what training on the
cluster costs it; the single-process reference beside it runs in a child process of its own, so each peak
is its own. `python -m bench.training --help` runs either engine with the dask engine's partition
count as an option (fixed rows per partition show how a worker's peak follows its partitions, not the rows).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from training.dataset import ParquetDataset, open_dataset
from training.distributed import (
    DaskSettings,
    dask_client,
    default_partitions,
    load_partitions,
    partition_folders,
    peak_rss_mib,
    sorted_workers,
    train_distributed,
)
from training.features import FRAUD_FEATURES
from training.generate import GenerateSpec, generate_to_file
from training.ingest import load_raw
from training.train import TrainParams, train_model

TARGET = "is_fraud"


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

    raw = load_raw(path, FRAUD_FEATURES.raw_schema, (TARGET,))
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
    result = train_model(raw, FRAUD_FEATURES, TARGET, TrainParams(num_boost_round=max_rounds, seed=seed))
    t_train = time.perf_counter() - t0
    return TrainingBenchmark(
        rows=rows,
        generate_rows_per_s=rows / t_gen,
        scan_rows_per_s=rows / t_scan,
        features_rows_per_s=rows / t_feat,
        train_rows_per_s=rows / t_train,
        train_s=t_train,
        trees=result.booster.num_boosted_rounds(),
        raw_in_memory_gib=raw_gib,
        peak_rss_gib=peak_rss_mib() / 1024,
    )


@dataclass(frozen=True)
class DaskTrainingBenchmark:
    """Figures of one run; rows/s are over all rows; peaks are resident-memory high-water marks."""

    rows: int
    workers: int
    partitions: int
    read_rows_per_s: float  # every partition read (hash filter included), no features
    features_rows_per_s: float  # read + sort + the feature spec + the write to disk, per partition
    train_rows_per_s: float  # the whole engine: features, global split and fit, xgboost.dask, test metrics
    train_s: float
    trees: int
    worker_peak_rss_gib: list[float]
    client_peak_rss_gib: float

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"rows                      {self.rows:,} ({self.partitions} partitions, {self.workers} workers)",
            f"read partitions           {self.read_rows_per_s:,.0f} rows/s",
            f"features (read + sort)    {self.features_rows_per_s:,.0f} rows/s",
            f"train ({self.trees} trees)         {self.train_rows_per_s:,.0f} rows/s ({self.train_s:.1f} s, "
            "features included)",
            f"peak RSS per worker       {', '.join(f'{g:.2f}' for g in self.worker_peak_rss_gib)} GiB",
            f"peak RSS of the client    {self.client_peak_rss_gib:.2f} GiB",
        ]


def _read_partition(dataset: ParquetDataset, key: str, index: int, partitions: int) -> int:
    return dataset.partition(key, index, partitions).collect().height


def run_dask_training_benchmark(rows: int, workdir: Path, workers: int = 2, seed: int = 7,
                                max_rounds: int = 100, scheduler: str | None = None,
                                partitions: int | None = None) -> DaskTrainingBenchmark:
    """Generate `rows` transactions into `workdir` (in a child process), then time the engine's steps
    (`partitions`: default_partitions for the rows and workers when None)."""
    path = workdir / f"bench_{rows}.parquet"
    if not path.exists():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(generate_to_file, GenerateSpec(rows=rows, seed=seed), path).result()
    dataset = open_dataset(str(path), {**FRAUD_FEATURES.raw_schema, TARGET: None}, "card_id")
    params = TrainParams(num_boost_round=max_rounds, seed=seed)
    with dask_client(DaskSettings(scheduler=scheduler, workers=workers)) as client:
        homes = sorted_workers(client)
        n_parts = partitions or default_partitions(rows, len(homes))
        t0 = time.perf_counter()
        client.gather([client.submit(_read_partition, dataset, "card_id", i, n_parts, workers=[homes[i % len(homes)]],
                                     pure=False) for i in range(n_parts)])
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        with partition_folders(client) as run_id:
            load_partitions(client, dataset, FRAUD_FEATURES, TARGET, "card_id", n_parts, run_id)
            t_feat = time.perf_counter() - t0
        t0 = time.perf_counter()
        run = train_distributed(client, dataset, FRAUD_FEATURES, TARGET, "card_id", params, n_parts)
        t_train = time.perf_counter() - t0
    return DaskTrainingBenchmark(
        rows=rows, workers=run.workers, partitions=run.partitions,
        read_rows_per_s=rows / t_read, features_rows_per_s=rows / t_feat, train_rows_per_s=rows / t_train,
        train_s=t_train, trees=run.result.booster.num_boosted_rounds(),
        worker_peak_rss_gib=[round(m / 1024, 2) for m in run.worker_peak_rss_mib],
        client_peak_rss_gib=round(peak_rss_mib() / 1024, 2),
    )


@dataclass(frozen=True)
class DaskBenchmarkWithReference:
    """The dask engine's figures beside the single-process engine's on `single.rows` rows (None: not run)."""

    dask: DaskTrainingBenchmark
    single: TrainingBenchmark | None

    def to_dict(self) -> dict:
        return {"dask": self.dask.to_dict(), "single": self.single.to_dict() if self.single else None}

    def lines(self) -> list[str]:
        dask = ["dask engine", *(f"  {line}" for line in self.dask.lines())]
        if self.single is None:
            return dask
        return [*dask, "single-process engine (reference)", *(f"  {line}" for line in self.single.lines())]


def run_dask_benchmark_with_reference(rows: int, workdir: Path, reference_rows: int, workers: int = 2,
                                      max_rounds: int = 100, partitions: int | None = None
                                      ) -> DaskBenchmarkWithReference:
    """run_training_benchmark on `reference_rows` rows (0: none) in a child process, then
    run_dask_training_benchmark on `rows`; data generated for one is reused by the other at the same rows."""
    single = None
    if reference_rows:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            single = pool.submit(run_training_benchmark, reference_rows, workdir, max_rounds=max_rounds).result()
    dask = run_dask_training_benchmark(rows, workdir, workers=workers, max_rounds=max_rounds, partitions=partitions)
    return DaskBenchmarkWithReference(dask=dask, single=single)


def main(argv: list[str] | None = None) -> None:
    """Command line: one benchmark run, its figures as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="transactions to generate and train on")
    parser.add_argument("--engine", choices=["single", "dask"], default="single")
    parser.add_argument("--workers", type=int, default=2, help="dask: workers of the local cluster")
    parser.add_argument("--partitions", type=int, default=None,
                        help="dask: entity partitions (default: one per worker, more above 5M rows each)")
    parser.add_argument("--reference-rows", type=int, default=0,
                        help="dask: also the single-process engine on this many rows, in the same run (0: none)")
    parser.add_argument("--max-rounds", type=int, default=100, help="boosting rounds at most")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the generated data goes (kept and reused; default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.engine == "dask":
            result = run_dask_benchmark_with_reference(args.rows, workdir, args.reference_rows, workers=args.workers,
                                                       max_rounds=args.max_rounds, partitions=args.partitions)
        else:
            result = run_training_benchmark(args.rows, workdir, max_rounds=args.max_rounds)
    print(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":
    main()
