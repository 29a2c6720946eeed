"""The dask engine on a real LocalCluster: same features as one process, a served model, determinism, faults."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
import numpy as np
import polars as pl
import psutil
import pytest
from distributed import Client
from mlflow.tracking import MlflowClient

from export.pipeline import export_model
from export.repository import ModelRepository
from server.client import ScoringClient, load_features, score_raw
from server.launcher import free_port
from training.dask_pipeline import train_and_register_dask
from training.dataset import open_dataset
from training.distributed import (TRAIN_TASK_PREFIX, DaskSettings, cluster_workers, dask_client, encoded_partition,
                                  fit_globally, global_split, load_partitions, partition_folders, train_distributed)
from training.errors import DataError, DistributedError, SettingsError
from training.features import FRAUD_FEATURES
from training.generate import GenerateSpec, generate_transactions
from training.tracking import EXPERIMENT
from training.train import TrainParams
from treeops.workspace import Workspace

from triton_fixtures import serving

pytestmark = [pytest.mark.slow]

T = TypeVar("T")

TARGET = "is_fraud"
SPEC = FRAUD_FEATURES
#: Rows of the feature-equality test: 1M as the issue asks (about 40 s here on 2 shared cores);
#: TREEOPS_DASK_EQUALITY_ROWS lowers it on a slower machine.
EQUALITY_ROWS = int(os.environ.get("TREEOPS_DASK_EQUALITY_ROWS", "1000000"))


def write_dataset(frame: pl.DataFrame, folder: Path, files: int) -> Path:
    """`frame` as `files` Parquet files in file order (so every card's rows span several files)."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-frame.height // files)
    for i in range(files):
        frame.slice(i * size, size).write_parquet(folder / f"part-{i:03d}.parquet")
    return folder


def dask_processes() -> list[psutil.Process]:
    """Live child processes of this test process that a LocalCluster spawned (nannies and workers)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "spawn_main" in cmd or "distributed" in cmd:
            out.append(child)
    return out


def assert_no_dask_processes(timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while dask_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = dask_processes()
    assert not left, f"the local cluster left processes behind: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = generate_transactions(GenerateSpec(rows=60_000, seed=3))
    return write_dataset(frame, tmp_path_factory.mktemp("dask") / "transactions", files=3)


def test_distributed_features_equal_single_machine(tmp_path: Path) -> None:
    """Same rows, same float32 features, same split and vocabularies as the one-process path, on 1M rows."""
    frame = generate_transactions(GenerateSpec(rows=EQUALITY_ROWS, seed=5))
    folder = write_dataset(frame, tmp_path / "ds", files=4)
    params = TrainParams()
    # The one-process definition (training/train.py): global time order, vocabularies of the train slice.
    ordered = frame.lazy().sort(list(SPEC.order_by))
    computed = SPEC.compute(ordered, keep=(TARGET, "transaction_id")).collect()
    n = computed.height
    n_test, n_valid = int(n * params.test_fraction), int(n * params.valid_fraction)
    n_train = n - n_test - n_valid
    single_fit = SPEC.fit(computed.head(n_train))
    split_codes = np.repeat([0, 1, 2], [n_train, n_valid, n_test])
    by_id = np.argsort(computed["transaction_id"].to_numpy(), kind="stable")
    single_x = single_fit.matrix(computed)[by_id]
    single_split = split_codes[by_id]
    del computed

    ds = open_dataset(str(folder), {**SPEC.raw_schema, TARGET: None}, "card_id")
    with dask_client(DaskSettings(workers=2)) as client, partition_folders(client) as run_id:
        parts = load_partitions(client, ds, SPEC, TARGET, "card_id", 4, run_id)
        split = global_split(parts, ds.count_rows(), params)
        parts = parts.split_at(split)
        fitted = fit_globally(parts, SPEC)
        frames = parts.gather(encoded_partition, fitted)
    assert_no_dask_processes()
    merged = pl.concat(frames).sort("__order_1")  # order_by = (timestamp, transaction_id)
    assert merged.height == n and all(f.height for f in frames), "every row in exactly one non-empty partition"
    assert merged["__order_1"].to_numpy().tolist() == np.sort(frame["transaction_id"].to_numpy()).tolist()
    assert fitted.vocabularies == single_fit.vocabularies
    assert split.rows == {"train": n_train, "valid": n_valid, "test": n_test}
    np.testing.assert_array_equal(merged["__split"].to_numpy(), single_split)
    x = np.ascontiguousarray(merged.select(SPEC.names).to_numpy(), dtype=np.float32)
    assert x.dtype == single_x.dtype and x.shape == single_x.shape
    assert np.array_equal(x, single_x, equal_nan=True), "distributed features differ from the one-process ones"
    assert np.isnan(x).any(), "the comparison covers missing values too"


@pytest.mark.triton
def test_cli_dask_train_register_export_serve(dataset: Path, tmp_path: Path, treeops) -> None:
    """`treeops train --engine dask` -> registered version -> exported (parity gate) -> Triton scores = booster."""
    ws = Workspace(tmp_path / "ws")
    done = treeops("train", "--engine", "dask", "--workers", "2", "--data", str(dataset), "--max-rounds", "40",
                   "--json", workspace=ws.root)
    assert done.returncode == 0, done.stderr[-2000:]
    mlflow.set_tracking_uri(ws.tracking_uri)
    mv = MlflowClient().get_model_version_by_alias("fraud", "champion")
    run = MlflowClient().get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["engine"] == "dask" and run.data.params["scheduler"] == "local"
    assert run.data.params["workers"] == "2" and run.data.params["partitions"] == "2"
    assert 50 < run.data.metrics["worker_peak_rss_mib"] < 4096
    assert {"worker_0_peak_rss_mib", "worker_1_peak_rss_mib", "client_peak_rss_mib"} <= set(run.data.metrics)

    repo = ModelRepository(ws.model_repository)
    export_model("fraud", repo)
    booster = mlflow.xgboost.load_model("models:/fraud@champion")
    features = load_features(repo.version_dir("fraud", int(mv.version)))
    raw = pl.read_parquet(dataset).select(*SPEC.raw_schema).tail(400)
    with serving(ws) as server:
        with ScoringClient(server.settings.grpc_url) as client:
            scores = score_raw(client, features, raw)
    np.testing.assert_allclose(scores.positive, booster.inplace_predict(features.matrix_raw(raw)), atol=1e-5)
    assert scores.model_version == str(mv.version)


def run_files(client: Client) -> dict[str, list[str]]:
    """What runs left in each worker's local directory (the partition files and XGBoost's caches go in treeops-*)."""
    return client.run(lambda dask_worker: sorted(p.name for p in Path(dask_worker.local_directory).glob("treeops-*")))


def test_same_data_seed_and_workers_give_the_same_model(dataset: Path) -> None:
    """Two runs, each on a fresh 2-worker LocalCluster: bit-identical boosters; no run files left, also after a
    run that fails once the partition files are written."""
    ds = open_dataset(str(dataset), {**SPEC.raw_schema, TARGET: None}, "card_id")
    models = []
    for i in range(2):
        with dask_client(DaskSettings(workers=2)) as client:
            run = train_distributed(client, ds, SPEC, TARGET, "card_id", TrainParams(num_boost_round=30, seed=11))
            assert run_files(client) == {w: [] for w in cluster_workers(client)}
            if i == 0:
                with pytest.raises(SettingsError, match="unknown objective 'bogus'"):
                    train_distributed(client, ds, SPEC, TARGET, "card_id", TrainParams(objective="bogus"))
                assert run_files(client) == {w: [] for w in cluster_workers(client)}
        models.append(run.result.booster.save_raw("json"))
    assert_no_dask_processes()
    assert models[0] == models[1]


def _fails_cleanly(data: Path | str, tmp_path: Path, **settings: object) -> str:
    """Run the engine, expect a one-line training error; check no version, a FAILED run and no processes."""
    ws = Workspace(tmp_path / "ws")
    with pytest.raises((DataError, DistributedError)) as info:
        train_and_register_dask(str(data), TARGET, "fraud", settings=DaskSettings(**settings),
                                params=TrainParams(num_boost_round=5), tracking_uri=ws.tracking_uri,
                                artifact_root=ws.artifact_root)
    return _failed_cleanly(ws, info.value)


def _failed_cleanly(ws: Workspace, error: BaseException) -> str:
    """No worker process left, no version registered, the one run FAILED with the error; the message in one line."""
    assert_no_dask_processes()
    mlflow.set_tracking_uri(ws.tracking_uri)
    client = MlflowClient()
    assert client.search_registered_models() == [] or not client.search_model_versions("name='fraud'")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    message = str(error)
    assert "\n" not in message and runs[0].data.tags["error"]
    return message


@pytest.mark.timeout(240)  # a hang fails the test (pytest-timeout) instead of holding the suite
def test_worker_killed_during_training_fails_fast(dataset: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL one worker of the command's LocalCluster while xgboost trains: a clear error soon, never a hang.

    The monitoring client, opened after the engine's own, becomes the process's default client, as in a
    notebook: the engine's waits must still go through its own client (xgboost.dask's deadlocked the event
    loop before `watch_workers` made it current).
    """
    caplog.set_level(logging.INFO, logger="training.distributed")
    ws = Workspace(tmp_path / "ws")
    outcome: dict[str, BaseException] = {}

    def train() -> None:
        try:  # early stopping off and a small step: xgboost is still training when the worker dies
            train_and_register_dask(str(dataset), TARGET, "fraud", settings=DaskSettings(workers=2),
                                    params=TrainParams(num_boost_round=3000, early_stopping_rounds=3000,
                                                       learning_rate=0.001),
                                    tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    address = _wait_for(lambda: next((m.group(1) for r in caplog.records
                                      if (m := re.search(r"scheduler (tcp://\S+),", r.getMessage()))), None),
                        60, "the local cluster's log line naming its scheduler")
    with Client(address, timeout=10) as monitor:
        # One training task per worker, keyed treeops-train-<rank>-<run>.
        victim = _wait_for(lambda: next((w for w, keys in monitor.processing().items()
                                         if any(str(k).startswith(TRAIN_TASK_PREFIX) for k in keys)), None),
                           120, "a worker's training task")
        pid = monitor.run(os.getpid, workers=[victim])[victim]
        time.sleep(1)  # a few boosting rounds in
    killed = time.monotonic()
    psutil.Process(pid).kill()
    thread.join(90)
    took = time.monotonic() - killed
    assert not thread.is_alive(), "training still runs 90 s after a worker was killed"
    assert "error" in outcome, "training finished before the kill; make it longer"
    message = _failed_cleanly(ws, outcome["error"])
    assert isinstance(outcome["error"], DistributedError), message
    assert f"Dask worker(s) {victim} left the cluster during training" in message
    assert took < 30, f"the error came {took:.0f} s after the kill"


def _wait_for(probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (found := probe()) is not None:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout_s:g} s")


def test_unreachable_scheduler(dataset: Path, tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    message = _fails_cleanly(dataset, tmp_path, scheduler=address, connect_timeout_s=2)
    assert f"cannot reach the Dask scheduler at {address}" in message


def test_corrupt_partition_file_is_named(dataset: Path, tmp_path: Path) -> None:
    folder = write_dataset(pl.read_parquet(dataset), tmp_path / "ds", files=2)
    bad = folder / "part-009.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    message = _fails_cleanly(folder, tmp_path)
    assert f"Parquet file {bad} cannot be read" in message


def test_partition_with_a_different_schema_is_named(dataset: Path, tmp_path: Path) -> None:
    frame = pl.read_parquet(dataset)
    folder = write_dataset(frame, tmp_path / "ds", files=2)
    odd = folder / "part-009.parquet"
    frame.head(100).with_columns(pl.col("amount").cast(pl.String)).write_parquet(odd)
    message = _fails_cleanly(folder, tmp_path)
    assert f"Parquet file {odd}: column 'amount' is String" in message


def test_text_in_a_numeric_column_names_the_file_and_row(dataset: Path, tmp_path: Path) -> None:
    frame = pl.read_parquet(dataset).with_columns(pl.col("amount").cast(pl.String))
    folder = write_dataset(frame, tmp_path / "ds", files=2)
    second = folder / "part-001.parquet"
    pl.read_parquet(second).with_columns(
        pl.when(pl.int_range(pl.len()) == 17).then(pl.lit("n/a")).otherwise(pl.col("amount")).alias("amount")
    ).write_parquet(second)
    message = _fails_cleanly(folder, tmp_path)
    assert (f"Parquet file {folder / 'part-000.parquet'}: column 'amount' must be numeric (Float64) but is String, "
            f"and row 18 of {second} holds 'n/a'; write it as a number") in message


def test_text_timestamps_are_named(dataset: Path, tmp_path: Path) -> None:
    frame = pl.read_parquet(dataset).with_columns(pl.col("timestamp").dt.to_string())
    folder = write_dataset(frame, tmp_path / "ds", files=2)
    message = _fails_cleanly(folder, tmp_path)
    assert f"Parquet file {folder / 'part-000.parquet'}: column 'timestamp' must be a timestamp" in message


def test_missing_entity_key_is_named(dataset: Path, tmp_path: Path) -> None:
    frame = pl.read_parquet(dataset)
    folder = write_dataset(frame, tmp_path / "ds", files=2)
    odd = folder / "part-009.parquet"
    frame.head(100).drop("card_id").write_parquet(odd)
    message = _fails_cleanly(folder, tmp_path)
    assert f"Parquet file {odd} lacks entity key ['card_id']" in message


def _null_rows(frame: pl.DataFrame, column: str) -> list[int]:
    """1-based rows of `frame` where `column` is null: what the error names."""
    return [i + 1 for i in frame.with_row_index("i").filter(pl.col(column).is_null())["i"].to_list()]


def test_failure_on_the_cluster_shuts_it_down(dataset: Path, tmp_path: Path) -> None:
    """Missing labels are found by the workers: the error names the file and rows, the run fails, the cluster is gone."""
    frame = pl.read_parquet(dataset).with_columns(
        pl.when(pl.col("transaction_id") % 1000 == 0).then(None).otherwise(pl.col(TARGET)).alias(TARGET))
    folder = write_dataset(frame, tmp_path / "ds", files=2)
    first = pl.read_parquet(folder / "part-000.parquet")
    rows = _null_rows(first, TARGET)
    message = _fails_cleanly(folder, tmp_path)
    assert (f"target column {TARGET!r} of {folder / 'part-000.parquet'} has {len(rows)} missing, NaN or infinite "
            f"value(s) (rows {', '.join(map(str, rows[:10]))} and {len(rows) - 10} more)") in message


def test_missing_timestamp_names_the_file_and_rows(dataset: Path, tmp_path: Path) -> None:
    frame = pl.read_parquet(dataset)
    folder = write_dataset(frame, tmp_path / "ds", files=2)
    odd = folder / "part-009.parquet"
    bad = frame.head(100).with_columns(
        pl.when(pl.col("transaction_id").is_in([7, 42])).then(None).otherwise(pl.col("timestamp")).alias("timestamp"))
    bad.write_parquet(odd)
    rows = ", ".join(map(str, _null_rows(bad, "timestamp")))
    message = _fails_cleanly(folder, tmp_path)
    assert f"Parquet file {odd}: column 'timestamp' has 2 missing value(s) (rows {rows});" in message


def test_cli_reports_a_bad_dataset_in_one_line(dataset: Path, tmp_path: Path, treeops) -> None:
    folder = write_dataset(pl.read_parquet(dataset), tmp_path / "ds", files=2)
    bad = folder / "part-009.parquet"
    bad.write_bytes(b"not parquet at all")
    done = treeops("train", "--engine", "dask", "--data", str(folder), workspace=tmp_path / "ws")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]  # MLflow logs its own lines
    assert len(errors) == 1 and f"Parquet file {bad} cannot be read" in errors[0], done.stderr[-1000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["train", "--data", "transactions/"], ["bench", "training"]])
def test_cli_unknown_engine_is_a_settings_error(command: list[str], tmp_path: Path, treeops) -> None:
    """`--engine bogus`: the project's settings error (exit 2) listing the engines, before any work starts."""
    done = treeops(*command, "--engine", "bogus", "--json", workspace=tmp_path / "ws")
    assert done.returncode == 2, done.stderr[-1000:]
    body = json.loads(done.stdout)
    expected = "unknown engine 'bogus'; choose one of ['single', 'dask']"
    assert body == {"error": expected, "kind": "SettingsError", "exit_code": 2}
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [f"error: {expected}"]
    assert "Traceback" not in done.stderr and not (tmp_path / "ws").exists()
