"""Training on a Dask cluster: the same feature spec per entity partition, XGBoost external memory per worker.

Each partition (rows whose entity key hashes to it, sorted by the spec's order) is featurised on
its worker and written there as one Parquet file in the run's folder (removed when the run ends,
whatever the outcome); the cluster's memory holds only each file's small `PartitionFile`. The
global steps read just the columns they need: vocabularies are the union of the partitions'
training-slice vocabularies (equal to the single-machine fit), and the train/valid/test split uses
one global cut-off in the spec's order, found by counting on the workers. Each file is sorted, so a
split is a row range of it. Then one task per worker, joined by XGBoost's collective (a
`RabitTracker` on the scheduler, as `xgboost.dask` does), builds an `ExtMemQuantileDMatrix` from
its files `BATCH_ROWS` at a time and trains: a worker's memory follows a partition, not its share
of the rows. The client holds only counts, vocabularies, cut-offs, the capped test holdout, the test
labels and predictions, and the booster.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import xgboost as xgb

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
#: Rows of one batch handed to XGBoost (external memory) or predicted at once: training memory follows it.
BATCH_ROWS = 1_000_000
#: Key prefix of the per-worker training tasks (what a dashboard or a test sees running).
TRAIN_TASK_PREFIX = "treeops-train-"
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


# --- partition files on the workers' disks -------------------------------------------------------


@dataclass(frozen=True)
class PartitionFile:
    """One partition's computed features (sorted by the spec's order) in a Parquet file on its worker's disk.

    `valid_at` and `test_at` are the rows before the global valid and test cut-offs (set by
    `Partitions.split_at`): the file is sorted, so each split is a row range of it.
    """

    index: int
    worker: str
    path: str
    rows: int
    valid_at: int = 0
    test_at: int = 0

    def span(self, code: int) -> tuple[int, int]:
        """(first row, row count) of split `code` (TRAIN, VALID or TEST) in the file."""
        starts = (0, self.valid_at, self.test_at, self.rows)
        return starts[code], starts[code + 1] - starts[code]

    def scan(self, code: int | None = None) -> pl.LazyFrame:
        """The file, or only split `code`'s rows of it; columns are read only as they are selected."""
        lf = pl.scan_parquet(self.path)
        return lf if code is None else lf.slice(*self.span(code))


def run_folder(run_id: str, worker: Any = None) -> Path:
    """`worker`'s (default: the current task's worker's) folder for run `run_id`'s files, in its local directory."""
    from distributed import get_worker

    return Path((worker or get_worker()).local_directory) / f"treeops-{run_id}"


@contextmanager
def partition_folders(client: Any) -> Iterator[str]:
    """A run id whose folder every worker removes when the block ends, however it ends."""
    run_id = uuid.uuid4().hex[:12]
    try:
        yield run_id
    finally:
        try:
            client.run(_remove_run_folder, run_id, on_error="ignore")
        except OSError as exc:  # the scheduler is gone: a LocalCluster removes its workers' folders itself
            log.warning("could not remove the run folders treeops-%s on the workers (%s: %s); delete them by hand",
                        run_id, type(exc).__name__, exc)


def _remove_run_folder(run_id: str, dask_worker: Any = None) -> None:
    shutil.rmtree(run_folder(run_id, dask_worker), ignore_errors=True)


class Partitions:
    """The partition files of one run, each on one worker; `map` runs a function next to each file."""

    def __init__(self, client: Any, files: Sequence[PartitionFile]) -> None:
        self.client = client
        self.files = list(files)

    @property
    def workers(self) -> list[str]:
        return [f.worker for f in self.files]

    def map(self, fn: Any, *args: Any) -> list[Any]:
        return [self.client.submit(fn, f, *args, workers=[f.worker], allow_other_workers=False, pure=False)
                for f in self.files]

    def gather(self, fn: Any, *args: Any) -> list[Any]:
        return self.client.gather(self.map(fn, *args))

    def split_at(self, split: Split) -> Partitions:
        """The same files, each knowing the row ranges of the global split's train, valid and test rows."""
        bounds = self.gather(_split_bounds, split)
        return Partitions(self.client, [replace(f, valid_at=v, test_at=t) for f, (v, t) in zip(self.files, bounds)])


def cluster_workers(client: Any) -> dict[str, dict]:
    """Every worker the scheduler has now, by address, asked directly: `Client.scheduler_info` returns a cache
    that the client's periodic refresh overwrites with no workers, so under load it can list none."""
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


def sorted_workers(client: Any) -> list[str]:
    """Worker addresses in a fixed order (by name, then address), so partition i always has the same home."""
    info = cluster_workers(client)
    return sorted(info, key=lambda a: (str(info[a].get("name", "")), a))


def load_partitions(client: Any, dataset: ParquetDataset, spec: FeatureSpec, target: str, entity_key: str,
                    n_partitions: int, run_id: str) -> Partitions:
    """Read, sort and featurise every partition on its worker, which writes it to run `run_id`'s folder."""
    workers = sorted_workers(client)
    if not workers:
        raise DistributedError("the Dask cluster has no workers; start some (`dask worker SCHEDULER`) and retry")
    futures = [client.submit(_write_partition, dataset, spec.name, target, entity_key, i, n_partitions, run_id,
                             workers=[w], allow_other_workers=False, pure=False)
               for i, w in enumerate(workers[i % len(workers)] for i in range(n_partitions))]
    return Partitions(client, client.gather(futures))


def _write_partition(dataset: ParquetDataset, spec_name: str, target: str, key: str, index: int,
                     partitions: int, run_id: str) -> PartitionFile:
    from distributed import get_worker

    spec = SPECS[spec_name]
    raw = dataset.partition(key, index, partitions).sort(list(spec.order_by))
    order = [pl.col(c).alias(_order_col(i)) for i, c in enumerate(spec.order_by)]
    frame = spec.compute(raw.with_columns(order), keep=(target, *map(_order_col, range(len(spec.order_by))))).collect()
    folder = run_folder(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{index:05d}.parquet"
    frame.write_parquet(path)
    return PartitionFile(index, get_worker().address, str(path), frame.height)


def _order_col(i: int) -> str:
    return f"__order_{i}"


def _order_cols(part: PartitionFile) -> list[str]:
    return [c for c in part.scan().collect_schema() if c.startswith("__order_")]


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


def _first_physical(part: PartitionFile) -> np.ndarray:
    return part.scan().select(pl.col(_order_col(0)).to_physical().cast(pl.Int64)).collect().to_series().to_numpy()


def _first_bounds(part: PartitionFile) -> tuple[int, int]:
    first = _first_physical(part)
    return (int(first.min()), int(first.max())) if len(first) else (2**62, -(2**62))


def _count_first_le(part: PartitionFile, probes: np.ndarray) -> np.ndarray:
    """Rows whose first order column is <= each probe (the partition is sorted by it)."""
    return np.searchsorted(_first_physical(part), probes, side="right")


def _rows_with_first(part: PartitionFile, t: int) -> pl.DataFrame:
    first = pl.col(_order_col(0)).to_physical().cast(pl.Int64)
    return part.scan().select(_order_cols(part)).filter(first == t).with_columns(first).collect()


def _before(cols: Sequence[str], key: tuple) -> pl.Expr:
    """Lexicographic `(cols) < key`; the first order column compared by its physical value."""
    exprs = [pl.col(c).to_physical().cast(pl.Int64) if i == 0 else pl.col(c) for i, c in enumerate(cols)]
    out = exprs[-1] < key[-1]
    for i in reversed(range(len(cols) - 1)):
        out = (exprs[i] < key[i]) | ((exprs[i] == key[i]) & out)
    return out


def _split_bounds(part: PartitionFile, split: Split) -> tuple[int, int]:
    """Rows of the (sorted) file before the valid and before the test cut-off."""
    cols = _order_cols(part)
    counts = part.scan().select(_before(cols, split.valid_from).sum().alias("valid"),
                                _before(cols, split.test_from).sum().alias("test")).collect()
    return int(counts["valid"].item()), int(counts["test"].item())


# --- fitting and the matrices --------------------------------------------------------------------


def _train_vocabulary(part: PartitionFile, spec_name: str) -> dict[str, tuple[str, ...]]:
    return dict(SPECS[spec_name].fit(part.scan(TRAIN)).vocabularies)


def fit_globally(parts: Partitions, spec: FeatureSpec) -> FittedFeatures:
    """Vocabularies of the training rows of all (split) partitions: the sorted union, as the single-machine fit."""
    vocab: dict[str, set[str]] = {c: set() for c in spec.categorical}
    for part_vocab in parts.gather(_train_vocabulary, spec.name):
        for c, values in part_vocab.items():
            vocab[c].update(values)
    return FittedFeatures(spec, {c: tuple(sorted(v)) for c, v in vocab.items()})


def check_values(client: Any, dataset: ParquetDataset, target: str, spec: FeatureSpec) -> None:
    """`check_file_values` of every file, one task each on the cluster: the first bad file's error, its rows named."""
    futures = [client.submit(check_file_values, path, target, spec.order_by, pure=False) for path in dataset.files]
    for future in futures:  # in file order: the same file is named on every run
        future.result()


def _distinct_labels(part: PartitionFile, target: str) -> pl.Series:
    return part.scan().select(pl.col(target).unique().head(1000)).collect().to_series()


def infer_global_objective(parts: Partitions, target: str, params: TrainParams) -> Objective:
    """The objective the single-machine engine infers, from (capped) distinct labels; nulls are refused before."""
    distinct = pl.concat(parts.gather(_distinct_labels, target)).unique()
    return infer_objective(distinct, params.objective, params.threshold)


def encoded_partition(part: PartitionFile, fitted: FittedFeatures) -> pl.DataFrame:
    """Encoded float32 features plus the order columns and split code of one (split) partition."""
    frame = part.scan().collect()
    codes = pl.Series(_SPLIT, np.repeat(np.array([TRAIN, VALID, TEST], dtype=np.int8),
                                        [part.span(c)[1] for c in (TRAIN, VALID, TEST)]))
    return pl.concat([fitted.encode(frame.lazy()).collect(), frame.select(pl.col("^__order_.*$")), codes.to_frame()],
                     how="horizontal")


def _batches(parts: Sequence[PartitionFile], code: int, columns: Sequence[str]) -> Iterator[pl.DataFrame]:
    """Split `code`'s rows of `parts`, in file order, BATCH_ROWS at a time, only `columns` read."""
    for part in parts:
        start, length = part.span(code)
        for offset in range(start, start + length, BATCH_ROWS):
            yield part.scan().slice(offset, min(BATCH_ROWS, start + length - offset)).select(columns).collect()


class PartitionBatches(xgb.DataIter):
    """One split of a worker's partition files as XGBoost batches (features encoded, labels as the objective's)."""

    def __init__(self, parts: Sequence[PartitionFile], code: int, fitted: FittedFeatures, objective: Objective,
                 target: str, cache_prefix: str) -> None:
        self._parts, self._code, self._columns = list(parts), code, [*fitted.spec.names, target]
        self._fitted, self._objective, self._target = fitted, objective, target
        self._names = [xgb_safe(name) for name in fitted.spec.names]
        self._it = _batches(self._parts, code, self._columns)
        super().__init__(cache_prefix=cache_prefix, release_data=True)

    def next(self, input_data: Callable) -> bool:
        batch = next(self._it, None)
        if batch is None:
            return False
        input_data(data=self._fitted.matrix(batch), label=self._objective.encode_labels(batch[self._target]),
                   feature_names=self._names)
        return True

    def reset(self) -> None:
        self._it = _batches(self._parts, self._code, self._columns)


def _start_tracker(n_workers: int, timeout_s: int, dask_scheduler: Any = None) -> dict[str, Any]:
    """A RabitTracker in the scheduler's process (its address is one every worker reaches); its worker args."""
    from distributed.comm import get_address_host
    from xgboost.tracker import RabitTracker

    tracker = RabitTracker(n_workers=n_workers, host_ip=get_address_host(dask_scheduler.address), sortby="task",
                           timeout=timeout_s)
    tracker.start()
    threading.Thread(target=tracker.wait_for, name="treeops-rabit-tracker", daemon=True).start()
    return tracker.worker_args()


def _train_on_worker(parts: list[PartitionFile], rank: int, coll_args: dict[str, Any], booster_params: dict,
                     params: TrainParams, fitted: FittedFeatures, objective: Objective, target: str,
                     run_id: str) -> xgb.Booster | None:
    """This worker's share of collective training, from external-memory matrices of its files; rank 0's booster."""
    from xgboost.collective import CommunicatorContext

    folder = run_folder(run_id)
    nthread = booster_params["nthread"]
    with CommunicatorContext(**coll_args, dmlc_task_id=f"{rank:06d}"):
        dtrain = xgb.ExtMemQuantileDMatrix(
            PartitionBatches(parts, TRAIN, fitted, objective, target, str(folder / "train")), nthread=nthread)
        dvalid = xgb.ExtMemQuantileDMatrix(
            PartitionBatches(parts, VALID, fitted, objective, target, str(folder / "valid")), ref=dtrain,
            nthread=nthread)
        booster = xgb.train(booster_params, dtrain, num_boost_round=params.num_boost_round,
                            evals=[(dvalid, "valid")], early_stopping_rounds=params.early_stopping_rounds,
                            verbose_eval=False)
        del dtrain, dvalid
    return booster if rank == 0 else None


def train_collectively(parts: Partitions, params: TrainParams, fitted: FittedFeatures, objective: Objective,
                       target: str, run_id: str, collective_timeout_s: int) -> xgb.Booster:
    """One training task per worker holding partitions (ranks in worker order), joined by XGBoost's collective."""
    from xgboost.collective import Config

    homes = [w for w in sorted_workers(parts.client) if w in set(parts.workers)]
    for w in homes:
        mine = [f for f in parts.files if f.worker == w]
        empty = [name for name, code in (("train", TRAIN), ("valid", VALID)) if not sum(f.span(code)[1] for f in mine)]
        if empty:
            raise DataError(f"worker {w} holds no {' or '.join(empty)} rows in its {len(mine)} partition(s); "
                            "use fewer --partitions or workers, or more rows")
    coll_args = Config(timeout=collective_timeout_s).get_comm_config(
        parts.client.run_on_scheduler(_start_tracker, len(homes), collective_timeout_s))
    booster_params = {**params.booster_params(objective), "nthread": params.nthread or 1}
    futures = [parts.client.submit(_train_on_worker, [f for f in parts.files if f.worker == w], rank, coll_args,
                                   booster_params, params, fitted, objective, target, run_id, workers=[w],
                                   allow_other_workers=False, pure=False, key=f"{TRAIN_TASK_PREFIX}{rank}-{run_id}")
               for rank, w in enumerate(homes)]
    return parts.client.gather(futures)[0]


def _test_predictions(part: PartitionFile, booster: xgb.Booster, fitted: FittedFeatures, objective: Objective,
                      target: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predictions of the partition's test rows (predicted BATCH_ROWS at a time)."""
    names = [xgb_safe(name) for name in fitted.spec.names]
    ys, preds = [], []
    for batch in _batches([part], TEST, [*fitted.spec.names, target]):
        ys.append(objective.encode_labels(batch[target]))
        preds.append(booster.predict(xgb.DMatrix(fitted.matrix(batch), feature_names=names)))
    return np.concatenate(ys), np.concatenate(preds)


def _test_rows(part: PartitionFile, limit: int) -> pl.DataFrame:
    start, length = part.span(TEST)
    return part.scan().slice(start + max(0, length - limit), min(length, limit)).collect()


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
    """Features per partition (on the workers' disks), global split and vocabularies, collective external-memory
    training, test metrics; the run's files are removed at the end, whatever happens.

    A worker that leaves the cluster meanwhile (killed, out of memory, shut down) fails the run at once
    with a DistributedError naming it (see `watch_workers`).
    """
    with partition_folders(client) as run_id:
        return watch_workers(client, _train, client, dataset, spec, target, entity_key, params, partitions,
                             collective_timeout_s, run_id)


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
        try:  # waits go through the process's default client: make it this one, not a later one
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
        return set(cluster_workers(client))
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
           params: TrainParams, partitions: int | None, collective_timeout_s: int, run_id: str) -> DistributedRun:
    if not spec.order_by:
        raise DataError(f"the dask engine needs a feature spec with a time order; {spec.name!r} has none "
                        "(use the default engine for it)")
    n = dataset.count_rows()
    n_workers = len(sorted_workers(client))
    n_parts = partitions or default_partitions(n, max(1, n_workers))
    started = time.perf_counter()
    check_values(client, dataset, target, spec)
    parts = load_partitions(client, dataset, spec, target, entity_key, n_parts, run_id)
    split = global_split(parts, n, params)
    parts = parts.split_at(split)
    log.info("%d rows in %d partitions on %d workers: features and global split in %.1f s", n, n_parts, n_workers,
             time.perf_counter() - started)
    objective = infer_global_objective(parts, target, params)
    fitted = fit_globally(parts, spec)
    booster = train_collectively(parts, params, fitted, objective, target, run_id, collective_timeout_s)
    log.info("xgboost trained (external memory, %d workers) after %.1f s", len(set(parts.workers)),
             time.perf_counter() - started)
    best = booster.best_iteration
    booster = booster[: best + 1]
    tested = [f for f in parts.files if f.span(TEST)[1]]
    labels, predictions = zip(*Partitions(client, tested).gather(_test_predictions, booster, fitted, objective,
                                                                 target))
    metrics = objective.metrics(np.concatenate(labels), np.concatenate(predictions))
    metrics["best_iteration"] = float(best)
    per_part = HOLDOUT_MAX_ROWS // n_parts + 1
    tests = pl.concat(parts.gather(_test_rows, per_part))
    order = [c for c in tests.columns if c.startswith("__order_")]
    holdout = tests.sort(order).tail(HOLDOUT_MAX_ROWS).select(*spec.names, target)
    raw_parts = client.gather([client.submit(_raw_test_head, dataset, spec.name, entity_key, f.index, n_parts, split,
                                             RAW_HOLDOUT_ROWS, workers=[f.worker], allow_other_workers=False,
                                             pure=False)
                               for f in parts.files])
    raw_holdout = pl.concat(raw_parts).sort(order).head(RAW_HOLDOUT_ROWS).select(*spec.raw_schema)
    names = [xgb_safe(name) for name in spec.names]
    test_pred = booster.predict(xgb.DMatrix(fitted.matrix(holdout), feature_names=names))
    peaks = client.run(peak_rss_mib)
    workers = sorted_workers(client)
    log.info("trained %s model on %d partitions / %d workers with %d trees; test %s %.4f", objective.kind,
             n_parts, len(workers), best + 1, objective.primary_metric, metrics[objective.primary_metric])
    result = TrainResult(booster, target, objective, fitted, metrics, holdout, raw_holdout, test_pred, split.rows)
    return DistributedRun(result, len(workers), n_parts, [round(peaks[w], 1) for w in workers if w in peaks])
