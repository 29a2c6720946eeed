"""Training on a Dask cluster: the same feature spec per entity partition, XGBoost's own Dask interface.

Each partition (rows whose entity key hashes to it, sorted by the spec's order) lives on one
worker for the whole run: features are computed there with the spec's Polars expressions,
vocabularies are the union of the partitions' training-slice vocabularies (equal to the
single-machine fit), and the train/valid/test split uses one global cut-off in the spec's
order, found by counting on the workers. The client holds only counts, vocabularies, cut-offs,
the capped test holdout and the booster.
"""

from __future__ import annotations

import logging
import math
import resource
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from training.dataset import ParquetDataset, check_file_values
from training.errors import DataError, DistributedError, TrainingError
from training.features import SPECS, FeatureSpec, FittedFeatures
from training.objectives import Objective, infer_objective
from training.train import RAW_HOLDOUT_ROWS, TrainParams, TrainResult, xgb_safe

log = logging.getLogger(__name__)

#: Test rows gathered to the client for the holdout artifact (the newest ones; metrics use every test row).
HOLDOUT_MAX_ROWS = 1_000_000
#: Rows per partition the default partition count aims at: a partition is one task's memory.
ROWS_PER_PARTITION = 5_000_000
TRAIN, VALID, TEST = 0, 1, 2
_SPLIT = "__split"
_PROBES = 256


@dataclass(frozen=True)
class DaskSettings:
    """Where training runs: `scheduler` (tcp://HOST:8786) or, when None, a LocalCluster of `workers`.

    `partitions` defaults to the worker count, more when a partition would exceed ROWS_PER_PARTITION rows;
    `threads_per_worker` is also XGBoost's nthread on each worker. `collective_timeout_s` bounds one of
    XGBoost's collective operations (a peer that stops answering fails the run after it; XGBoost's default
    is 30 minutes).
    """

    scheduler: str | None = None
    workers: int = 2
    partitions: int | None = None
    threads_per_worker: int = 1
    connect_timeout_s: float = 10.0
    memory_limit: str = "auto"
    collective_timeout_s: int = 300


@contextmanager
def dask_client(settings: DaskSettings) -> Iterator[Any]:
    """A `distributed.Client`: connected to `settings.scheduler`, or to a LocalCluster that lives as long as it.

    Work stealing is off for a LocalCluster (and must be off on an external scheduler:
    DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING=False), so tasks run where they are pinned.
    """
    import dask
    from distributed import Client, LocalCluster

    if settings.scheduler:
        try:
            client = Client(settings.scheduler, timeout=settings.connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            raise DistributedError(
                f"cannot reach the Dask scheduler at {settings.scheduler} within {settings.connect_timeout_s:g} s "
                f"({type(exc).__name__}); check the address and that `dask scheduler` runs there"
            ) from exc
        with client:
            yield client
        return
    with dask.config.set({"distributed.scheduler.work-stealing": False}):
        cluster = LocalCluster(n_workers=settings.workers, threads_per_worker=settings.threads_per_worker,
                               processes=True, dashboard_address=":0", memory_limit=settings.memory_limit)
    log.info("local Dask cluster of %d workers: scheduler %s, dashboard %s", settings.workers,
             cluster.scheduler_address, cluster.dashboard_link)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


class Partitions:
    """One future per entity partition, each pinned to one worker; `map` runs a function next to each."""

    def __init__(self, client: Any, futures: Sequence[Any], workers: Sequence[str]) -> None:
        self.client = client
        self.futures = list(futures)
        self.workers = list(workers)

    def map(self, fn: Any, *args: Any) -> list[Any]:
        return [self.client.submit(fn, f, *args, workers=[w], allow_other_workers=False, pure=False)
                for f, w in zip(self.futures, self.workers)]

    def gather(self, fn: Any, *args: Any) -> list[Any]:
        return self.client.gather(self.map(fn, *args))


def sorted_workers(client: Any) -> list[str]:
    """Worker addresses in a fixed order (by name, then address), so partition i always has the same home."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(info, key=lambda a: (str(info[a].get("name", "")), a))


def load_partitions(client: Any, dataset: ParquetDataset, spec: FeatureSpec, target: str, entity_key: str,
                    n_partitions: int) -> Partitions:
    """Read, sort and featurise every partition on its worker; the frames stay there."""
    workers = sorted_workers(client)
    if not workers:
        raise DistributedError("the Dask cluster has no workers; start some (`dask worker SCHEDULER`) and retry")
    homes = [workers[i % len(workers)] for i in range(n_partitions)]
    futures = [client.submit(_load_partition, dataset, spec.name, target, entity_key, i, n_partitions,
                             workers=[w], allow_other_workers=False, pure=False)
               for i, w in enumerate(homes)]
    return Partitions(client, futures, homes)


def _load_partition(dataset: ParquetDataset, spec_name: str, target: str, key: str, index: int,
                    partitions: int) -> pl.DataFrame:
    spec = SPECS[spec_name]
    raw = dataset.partition(key, index, partitions).sort(list(spec.order_by))
    order = [pl.col(c).alias(_order_col(i)) for i, c in enumerate(spec.order_by)]
    return spec.compute(raw.with_columns(order), keep=(target, *map(_order_col, range(len(spec.order_by))))).collect()


def _order_col(i: int) -> str:
    return f"__order_{i}"


# --- the global time-ordered split ---------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Rows before `valid_from` (in the spec's order) train, before `test_from` validate, the rest test."""

    rows: dict[str, int]
    valid_from: tuple
    test_from: tuple


def global_split(parts: Partitions, n: int, params: TrainParams) -> Split:
    """The single-machine split sizes, with the cut-offs found as exact order statistics across partitions."""
    n_test = int(n * params.test_fraction)
    n_valid = int(n * params.valid_fraction)
    n_train = n - n_test - n_valid
    if min(n_train, n_valid, n_test) < 10:
        raise DataError(f"{n} rows is too few to split into train/valid/test; provide at least 100 rows")
    return Split({"train": n_train, "valid": n_valid, "test": n_test},
                 _kth_key(parts, n_train), _kth_key(parts, n_train + n_valid))


def _kth_key(parts: Partitions, k: int) -> tuple:
    """The order key of the row at global position k (0-based).

    A search on the first order column: each round asks every partition (sorted, so a binary search
    there) how many rows lie at or below 256 probes, and narrows to one probe interval; then the rows
    that tie on the found value are sorted by the full key.
    """
    bounds = parts.gather(_first_bounds)
    lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
    while lo < hi:  # invariant: count(first <= hi) > k, count(first <= lo - 1) <= k
        probes = np.unique(np.append(np.clip(np.linspace(lo, hi, _PROBES).astype(np.int64), lo, hi), hi))
        counts = np.sum(parts.gather(_count_first_le, probes), axis=0)
        above = int(np.argmax(counts > k))  # the first probe past position k (hi itself qualifies)
        hi = int(probes[above])
        lo = int(probes[above - 1]) + 1 if above else hi  # probes[0] is lo
    before = int(np.sum(parts.gather(_count_first_le, np.array([lo - 1]))))
    tied = pl.concat(parts.gather(_rows_with_first, lo)).sort(pl.all())
    return tuple(tied.row(k - before))


def _first_physical(part: pl.DataFrame) -> pl.Series:
    return part[_order_col(0)].to_physical().cast(pl.Int64)


def _first_bounds(part: pl.DataFrame) -> tuple[int, int]:
    first = _first_physical(part)
    return (int(first.min()), int(first.max())) if len(first) else (2**62, -(2**62))


def _count_first_le(part: pl.DataFrame, probes: np.ndarray) -> np.ndarray:
    """Rows whose first order column is <= each probe (the partition is sorted by it)."""
    return np.searchsorted(_first_physical(part).to_numpy(), probes, side="right")


def _rows_with_first(part: pl.DataFrame, t: int) -> pl.DataFrame:
    cols = [c for c in part.columns if c.startswith("__order_")]
    return part.filter(_first_physical(part) == t).select(cols).with_columns(
        pl.col(_order_col(0)).to_physical().cast(pl.Int64))


def _before(cols: Sequence[str], key: tuple) -> pl.Expr:
    """Lexicographic `(cols) < key`; the first order column compared by its physical value."""
    exprs = [pl.col(c).to_physical().cast(pl.Int64) if i == 0 else pl.col(c) for i, c in enumerate(cols)]
    out = exprs[-1] < key[-1]
    for i in reversed(range(len(cols) - 1)):
        out = (exprs[i] < key[i]) | ((exprs[i] == key[i]) & out)
    return out


def _with_split(part: pl.DataFrame, split: Split) -> pl.DataFrame:
    cols = [c for c in part.columns if c.startswith("__order_")]
    code = (pl.when(_before(cols, split.valid_from)).then(TRAIN)
            .when(_before(cols, split.test_from)).then(VALID).otherwise(TEST))
    return part.with_columns(code.cast(pl.Int8).alias(_SPLIT))


# --- fitting and the matrices --------------------------------------------------------------------


def _train_vocabulary(part: pl.DataFrame, spec_name: str, split: Split) -> dict[str, tuple[str, ...]]:
    rows = _with_split(part, split).filter(pl.col(_SPLIT) == TRAIN)
    return dict(SPECS[spec_name].fit(rows).vocabularies)


def fit_globally(parts: Partitions, spec: FeatureSpec, split: Split) -> FittedFeatures:
    """Vocabularies of the training rows of all partitions: the sorted union, as the single-machine fit."""
    vocab: dict[str, set[str]] = {c: set() for c in spec.categorical}
    for part_vocab in parts.gather(_train_vocabulary, spec.name, split):
        for c, values in part_vocab.items():
            vocab[c].update(values)
    return FittedFeatures(spec, {c: tuple(sorted(v)) for c, v in vocab.items()})


def check_values(client: Any, dataset: ParquetDataset, target: str, spec: FeatureSpec) -> None:
    """`check_file_values` of every file, one task each on the cluster: the first bad file's error, its rows named."""
    futures = [client.submit(check_file_values, path, target, spec.order_by, pure=False) for path in dataset.files]
    for future in futures:  # in file order: the same file is named on every run
        future.result()


def _distinct_labels(part: pl.DataFrame, target: str) -> pl.Series:
    return part[target].unique().head(1000)


def infer_global_objective(parts: Partitions, target: str, params: TrainParams) -> Objective:
    """The objective the single-machine engine infers, from (capped) distinct labels; nulls are refused before."""
    distinct = pl.concat(parts.gather(_distinct_labels, target)).unique()
    return infer_objective(distinct, params.objective, params.threshold)


def encoded_partition(part: pl.DataFrame, fitted: FittedFeatures, split: Split) -> pl.DataFrame:
    """Encoded float32 features plus the order columns and split code of one partition."""
    labelled = _with_split(part, split)
    extra = labelled.select(pl.col("^__order_.*$"), _SPLIT)
    return pl.concat([fitted.encode(labelled.lazy()).collect(), extra], how="horizontal")


def _split_arrays(part: pl.DataFrame, fitted: FittedFeatures, split: Split, objective: Objective, target: str,
                  code: int) -> tuple[np.ndarray, np.ndarray]:
    rows = _with_split(part, split).filter(pl.col(_SPLIT) == code)
    return fitted.matrix(rows), objective.encode_labels(rows[target])


def _dask_arrays(parts: Partitions, fitted: FittedFeatures, split: Split, objective: Objective, target: str,
                 code: int) -> tuple[Any, Any]:
    """X and y of one split as dask arrays whose blocks stay on their partitions' workers."""
    import dask
    import dask.array as da

    pairs = parts.map(_split_arrays, fitted, split, objective, target, code)
    lengths = parts.client.gather([parts.client.submit(_length, p, workers=[w], pure=False)
                                   for p, w in zip(pairs, parts.workers)])
    n_features = len(fitted.spec.features)
    xs, ys = [], []
    for pair, w, n in zip(pairs, parts.workers, lengths):
        if n == 0:
            continue
        x = parts.client.submit(_item, pair, 0, workers=[w], allow_other_workers=False, pure=False)
        y = parts.client.submit(_item, pair, 1, workers=[w], allow_other_workers=False, pure=False)
        xs.append(da.from_delayed(dask.delayed(x), shape=(n, n_features), dtype=np.float32))
        ys.append(da.from_delayed(dask.delayed(y), shape=(n,), dtype=np.float32))
    return da.concatenate(xs), da.concatenate(ys)


def _length(pair: tuple[np.ndarray, np.ndarray]) -> int:
    return len(pair[1])


def _item(pair: tuple, i: int) -> Any:
    return pair[i]


def _test_rows(part: pl.DataFrame, split: Split, limit: int) -> pl.DataFrame:
    rows = _with_split(part, split).filter(pl.col(_SPLIT) == TEST)
    return rows.tail(limit)


def _raw_test_head(dataset: ParquetDataset, spec_name: str, key: str, index: int, partitions: int, split: Split,
                   limit: int) -> pl.DataFrame:
    spec = SPECS[spec_name]
    raw = dataset.partition(key, index, partitions).sort(list(spec.order_by))
    order = [pl.col(c).alias(_order_col(i)) for i, c in enumerate(spec.order_by)]
    cols = [_order_col(i) for i in range(len(spec.order_by))]
    return (raw.with_columns(order).filter(~_before(cols, split.test_from)).head(limit)
            .select(*spec.raw_schema, *cols).collect())


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_partitions(rows: int, workers: int) -> int:
    """At least one partition per worker, and no partition above ROWS_PER_PARTITION rows."""
    return workers * max(1, math.ceil(rows / (workers * ROWS_PER_PARTITION)))


@dataclass
class DistributedRun:
    """A trained result plus what the cluster did: the lineage MLflow records."""

    result: TrainResult
    workers: int
    partitions: int
    worker_peak_rss_mib: list[float]


def train_distributed(client: Any, dataset: ParquetDataset, spec: FeatureSpec, target: str, entity_key: str,
                      params: TrainParams, partitions: int | None = None,
                      collective_timeout_s: int = DaskSettings.collective_timeout_s) -> DistributedRun:
    """Features per partition, global split and vocabularies, xgboost.dask training, test metrics.

    A worker that leaves the cluster meanwhile (killed, out of memory, shut down) fails the run at once
    with a DistributedError naming it (see `watch_workers`).
    """
    return watch_workers(client, _train, client, dataset, spec, target, entity_key, params, partitions,
                         collective_timeout_s)


def watch_workers(client: Any, fn: Any, *args: Any, poll_s: float = 0.5, grace_s: float = 5.0) -> Any:
    """`fn(*args)` in a thread, while the cluster's workers are watched: one that leaves fails the call.

    Partitions are pinned to their workers, so the scheduler cannot recompute a lost one elsewhere: its
    tasks would wait for the gone worker forever. The thread is a daemon: a call stuck on the lost
    worker ends when its client closes and never holds the process up. When `fn` fails on its own
    (XGBoost's collective usually notices a dead peer before the scheduler does), the scheduler gets
    `grace_s` to report a lost worker, so the error names the cause rather than a socket error.
    """
    started = _worker_addresses(client)
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:  # xgboost.dask waits through the process's default client: make it this one, not a later one
            with client.as_current():
                outcome["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name="treeops-dask-training", daemon=True).start()
    while not done.wait(poll_s):
        _raise_if_lost(client, started)
    error = outcome.get("error")
    if error is None:
        return outcome["value"]
    if not isinstance(error, TrainingError):
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            _raise_if_lost(client, started, error)
            time.sleep(poll_s)
    raise error


def _worker_addresses(client: Any) -> set[str]:
    try:
        return set(client.scheduler_info(n_workers=-1)["workers"])
    except OSError as exc:
        raise DistributedError(f"lost the Dask scheduler at {client.scheduler.address} ({type(exc).__name__}); "
                               "check that it still runs, then rerun") from exc


def _raise_if_lost(client: Any, started: set[str], cause: BaseException | None = None) -> None:
    lost = sorted(started - _worker_addresses(client))
    if lost:
        raise DistributedError(
            f"Dask worker(s) {', '.join(lost)} left the cluster during training (killed, out of memory or shut "
            "down); the partitions they held are gone, so the run stops; rerun on a whole cluster (out of memory: "
            "more memory per worker or more --partitions)") from cause


def _train(client: Any, dataset: ParquetDataset, spec: FeatureSpec, target: str, entity_key: str,
           params: TrainParams, partitions: int | None, collective_timeout_s: int) -> DistributedRun:
    import xgboost as xgb
    from xgboost import dask as dxgb
    from xgboost.collective import Config

    if not spec.order_by:
        raise DataError(f"the dask engine needs a feature spec with a time order; {spec.name!r} has none "
                        "(use the default engine for it)")
    n = dataset.count_rows()
    n_workers = len(sorted_workers(client))
    n_parts = partitions or default_partitions(n, max(1, n_workers))
    started = time.perf_counter()
    check_values(client, dataset, target, spec)
    parts = load_partitions(client, dataset, spec, target, entity_key, n_parts)
    split = global_split(parts, n, params)
    log.info("%d rows in %d partitions on %d workers: features and global split in %.1f s", n, n_parts, n_workers,
             time.perf_counter() - started)
    objective = infer_global_objective(parts, target, params)
    fitted = fit_globally(parts, spec, split)
    names = [xgb_safe(name) for name in spec.names]
    x_train, y_train = _dask_arrays(parts, fitted, split, objective, target, TRAIN)
    x_valid, y_valid = _dask_arrays(parts, fitted, split, objective, target, VALID)
    dtrain = dxgb.DaskQuantileDMatrix(client, x_train, y_train, feature_names=names)
    dvalid = dxgb.DaskQuantileDMatrix(client, x_valid, y_valid, feature_names=names, ref=dtrain)
    booster_params = {**params.booster_params(objective), "nthread": params.nthread or 1}
    out = dxgb.train(client, booster_params, dtrain, num_boost_round=params.num_boost_round,
                     evals=[(dvalid, "valid")], early_stopping_rounds=params.early_stopping_rounds,
                     verbose_eval=False,
                     coll_cfg=Config(timeout=collective_timeout_s))
    del dtrain, dvalid
    log.info("xgboost.dask trained after %.1f s", time.perf_counter() - started)
    booster = out["booster"]
    best = booster.best_iteration
    booster = booster[: best + 1]
    x_test, y_test = _dask_arrays(parts, fitted, split, objective, target, TEST)
    pred_all = dxgb.predict(client, booster, dxgb.DaskDMatrix(client, x_test, feature_names=names)).compute()
    metrics = objective.metrics(y_test.compute(), pred_all)
    metrics["best_iteration"] = float(best)
    per_part = HOLDOUT_MAX_ROWS // n_parts + 1
    tests = pl.concat(parts.gather(_test_rows, split, per_part))
    order = [c for c in tests.columns if c.startswith("__order_")]
    holdout = tests.sort(order).tail(HOLDOUT_MAX_ROWS).select(*spec.names, target)
    raw_parts = client.gather([client.submit(_raw_test_head, dataset, spec.name, entity_key, i, n_parts, split,
                                             RAW_HOLDOUT_ROWS, workers=[w], allow_other_workers=False, pure=False)
                               for i, w in enumerate(parts.workers)])
    raw_holdout = pl.concat(raw_parts).sort(order).head(RAW_HOLDOUT_ROWS).select(*spec.raw_schema)
    test_pred = booster.predict(xgb.DMatrix(fitted.matrix(holdout), feature_names=names))
    peaks = client.run(peak_rss_mib)
    workers = sorted_workers(client)
    log.info("trained %s model on %d partitions / %d workers with %d trees; test %s %.4f", objective.kind,
             n_parts, len(workers), best + 1, objective.primary_metric, metrics[objective.primary_metric])
    result = TrainResult(booster, target, objective, fitted, metrics, holdout, raw_holdout, test_pred, split.rows)
    return DistributedRun(result, len(workers), n_parts, [round(peaks[w], 1) for w in workers if w in peaks])
