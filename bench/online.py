"""The raw-transaction path of the serving benchmark: the fraud model on raw fields, its history in a real Redis.

One run, beside the feature-tensor benchmark model and on the same Triton (bench.serving):
1. `prepare_raw_model` generates `rows` card transactions (training.generate), trains the fraud model on the
   feature spec's history features and registers it in an MLflow store of the run, exports it with raw inputs
   through the export pipeline (`ExportSettings(raw_inputs=True)`, parity gate included) into the benchmark's
   repository, starts a redis-server of the run (online_store.redis_server.LocalRedis) and backfills it with the
   training transactions (online_store.backfill: rows/s is a figure of the run);
2. Triton serves it with TREEOPS_ONLINE_STORE_URL pointing at that Redis (TritonSettings.online_store_url);
3. `measure_raw_path`:
   - checks the served scores of `check_transactions` new transactions, sent one per request in time order,
     against offline features (the spec over the training transactions plus these) and xgboost: the parity
     gate's limits (max |diff| <= tolerance, 0 flipped decisions), before anything is timed;
   - a bare Redis round trip (PING) from this process, sequential, with the client the served model uses;
   - single raw transactions, sequential, then `concurrency` in flight with the light HTTP/2 client.

Every request is a new transaction (a fresh transaction_id) of a card drawn from the backfilled population, with
a timestamp after the training data, so each reads a real history and writes to it; a repeated id would take the
cheaper idempotent path, so the pool of pre-serialized transactions is sized for `max_txn_per_s` and a step that
would have sent one twice fails. The throughput step uses one load-generator process and one connection: the
light client walks through the pool in order there, while several processes or connections would each start
from the beginning of it.
"""

from __future__ import annotations

import logging
import math
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import polars as pl
import xgboost as xgb
from tritonclient.grpc import service_pb2

from bench.errors import RequestFailedError, SettingsError
from bench.loadgen import LoadGenerator
from bench.report import RawPath, Step, make_step
from bench.requests import INFER_METHOD, decode_outputs
from bench.sampling import Observer
from bench.settings import RawBenchSpec
from bench.steps import closed_step, logged, sequential_step
from export.parity import check_parity
from export.signature import ServedSignature
from export.triton_config import ServingSettings
from training.features import FRAUD_FEATURES, FittedFeatures
from training.generate import GenerateSpec, generate_transactions, write_transactions

log = logging.getLogger(__name__)

RAW_MODEL = "fraud"
#: Time between consecutive new transactions of the pool (all after the training data's last one).
_SPACING_US = 10_000
#: Time a closed-loop step runs before its warm-up starts (bench.loadgen: lead time of an in-process step).
_LEAD_S = 0.02


@dataclass
class RawModel:
    """The raw-transaction model exported for one run, with what its measurement needs.

    `signature`: what the exported version takes and returns; `history`: the training transactions (raw columns),
    backfilled into the store at `store_url`; `threshold`/`tolerance`: the objective's decision threshold and the
    parity gate's limit.
    """

    name: str
    signature: ServedSignature
    booster: xgb.Booster
    fitted: FittedFeatures
    history: pl.DataFrame
    store_url: str
    backfill_rows: int
    backfill_s: float
    backfill_rows_per_s: float
    threshold: float
    tolerance: float

    @property
    def history_features(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fitted.spec.features if f.history is not None)


@contextmanager
def prepare_raw_model(spec: RawBenchSpec, serving: ServingSettings, repository: Path,
                      work: Path) -> Iterator[RawModel]:
    """Generate, train and register, export with raw inputs into `repository`, start Redis and backfill it.

    `serving`: the ServingSettings of the benchmark model (the raw model is configured the same way); `work` holds
    the data, the MLflow store and Redis's files of this run (emptied first). Redis stops when the block exits.
    """
    import mlflow

    from export.pipeline import ExportSettings, export_model, version_signature
    from export.repository import ModelRepository
    from online_store.backfill import backfill
    from online_store.redis_server import LocalRedis
    from registry import versions as registry
    from training.pipeline import train_and_register
    from training.train import TrainParams

    if not any(f.history is not None for f in FRAUD_FEATURES.features):
        raise SettingsError(f"feature spec {FRAUD_FEATURES.name} declares no history features: the raw-transaction "
                            "path has nothing to read from the store; run with --no-raw-transactions")
    if work.exists():
        shutil.rmtree(work)
    shutil.rmtree(repository / RAW_MODEL, ignore_errors=True)
    data = write_transactions(generate_transactions(GenerateSpec(rows=spec.rows, seed=spec.seed)),
                              work / "data" / "train.parquet")
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    started = time.perf_counter()
    outcome = train_and_register(data, "is_fraud", RAW_MODEL, features=FRAUD_FEATURES.name,
                                 params=TrainParams(num_boost_round=spec.trees, max_depth=spec.depth, seed=spec.seed),
                                 tracking_uri=tracking_uri, artifact_root=work / "mlartifacts")
    mlflow.set_tracking_uri(tracking_uri)
    settings = ExportSettings(raw_inputs=True, serving=serving, target=spec.target)
    repo = ModelRepository(repository)
    exported = export_model(RAW_MODEL, repo, version=outcome.registered.version, settings=settings)
    with tempfile.TemporaryDirectory(prefix="treeops-bench-bundle-") as scratch:
        bundle = registry.load_bundle(registry.resolve(RAW_MODEL, version=exported.version), Path(scratch))
    log.info("raw-transaction model trained and exported in %.1f s (%d trees)", time.perf_counter() - started,
             bundle.booster.num_boosted_rounds())
    fitted = bundle.fitted
    with LocalRedis(work / "redis") as store:
        filled = backfill(store.url, fitted, data)
        log.info("backfilled %d rows in %.2f s (%.0f rows/s)", filled.rows, filled.seconds, filled.rows_per_s)
        history = pl.read_parquet(data).select(list(fitted.spec.raw_schema))
        yield RawModel(RAW_MODEL, version_signature(repo, RAW_MODEL, exported.version), bundle.booster, fitted,
                       history, store.url, filled.rows, filled.seconds, filled.rows_per_s, bundle.objective.threshold,
                       settings.tolerance)


def new_transactions(model: RawModel, n: int, seed: int) -> pl.DataFrame:
    """`n` new transactions in time order: fresh ids, cards of the backfilled population, times after the history."""
    rng = np.random.default_rng(seed)
    cards = model.history["card_id"].unique().to_numpy()
    fields = generate_transactions(GenerateSpec(rows=n, seed=seed)).select(list(model.fitted.spec.raw_schema))
    last_id = int(model.history["transaction_id"].max())
    last_us = int(model.history["timestamp"].dt.epoch("us").max())
    return fields.with_columns(
        transaction_id=pl.Series(np.arange(last_id + 1, last_id + 1 + n, dtype=np.int64)),
        card_id=pl.Series(rng.choice(cards, n)),
        timestamp=pl.Series(last_us + _SPACING_US * np.arange(1, n + 1, dtype=np.int64)).cast(pl.Datetime("us")),
    )


def raw_payloads(signature: ServedSignature, frame: pl.DataFrame, model: str = RAW_MODEL) -> list[bytes]:
    """One serialized `ModelInferRequest` per row of `frame`: each input the signature names, from the raw field of
    that name (String -> BYTES, Int64 -> INT64, Float64 -> FP64, Datetime -> INT64 epoch microseconds)."""
    request = service_pb2.ModelInferRequest(model_name=model)
    columns = []
    for t in signature.inputs:
        if t.name not in frame.columns:
            raise SettingsError(f"the served model {model} takes input {t.name!r}, which is no raw field of "
                                f"{FRAUD_FEATURES.name} ({frame.columns}); serve a raw-transaction export")
        request.inputs.add(name=t.name, datatype=t.datatype, shape=[1, 1])
        col = frame[t.name]
        if t.datatype == "BYTES":
            columns.append([struct.pack("<I", len(b)) + b for b in (v.encode() for v in col.fill_null("").to_list())])
        else:
            values = col.dt.epoch("us") if isinstance(col.dtype, pl.Datetime) else col
            array = np.ascontiguousarray(values.to_numpy(), dtype=t.numpy_dtype)
            columns.append([array[i : i + 1].tobytes() for i in range(len(array))])
    request.outputs.add(name=signature.output.name)
    payloads = []
    for row in zip(*columns, strict=True):
        request.ClearField("raw_input_contents")
        request.raw_input_contents.extend(row)
        payloads.append(request.SerializeToString())
    return payloads


def check_raw_scores(url: str, model: RawModel, checked: pl.DataFrame,
                     payloads: Sequence[bytes]) -> tuple[float, int, int]:
    """Send `checked` one per request in time order and compare Triton's scores with offline features + xgboost
    over the backfilled history plus these transactions; returns (max |diff|, flipped decisions, response bytes).

    RequestFailedError when the answers miss the parity gate's limits.
    """
    scores, size = [], 0
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(INFER_METHOD)
        for payload in payloads:
            try:
                answer = call(payload)
            except grpc.RpcError as exc:
                raise RequestFailedError(f"{RAW_MODEL} on {url} failed: {exc.code().name} {exc.details()}") from exc
            size = len(answer)
            scores.append(decode_outputs(model.signature, answer).reshape(1, -1))
    served = np.concatenate(scores)
    spec = model.fitted.spec
    frame = pl.concat([model.history, checked.select(model.history.columns)])
    ordered = frame.sort(list(spec.order_by)) if spec.order_by else frame
    computed = spec.compute(ordered.lazy(), keep=("transaction_id",)).collect()
    offline = computed.join(checked.select("transaction_id"), on="transaction_id", how="semi").sort("transaction_id")
    report = check_parity(model.booster, lambda _x: served, model.fitted.matrix(offline),
                          tolerance=model.tolerance, threshold=model.threshold)
    if not report.passed:
        raise RequestFailedError(
            f"{RAW_MODEL}'s served scores of {report.rows} new transactions differ from offline features + xgboost: "
            f"max |diff| {report.max_abs_diff:.3g} (limit {model.tolerance:g}), {report.flipped_decisions} flipped "
            f"decisions (row {report.worst_index} worst); see triton.log in the benchmark's workdir")
    return report.max_abs_diff, report.flipped_decisions, size


def redis_ping_step(url: str, requests: int, warmup: int) -> Step:
    """Bare Redis round trips (PING) from this process, one at a time, with the client the served model uses."""
    from online_store.settings import OnlineStoreSettings

    client = OnlineStoreSettings().client(url)
    try:
        for _ in range(warmup):
            client.ping()
        samples = np.empty(requests, dtype=np.int64)
        cpu0, start = time.process_time(), time.perf_counter()
        for i in range(requests):
            t0 = time.perf_counter_ns()
            client.ping()
            samples[i] = time.perf_counter_ns() - t0
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    finally:
        client.close()
    return logged(make_step("redis PING", "redis", 1, 0, samples, 0, elapsed, cpu, 0.0, None), [])


def measure_raw_path(spec: RawBenchSpec, model: RawModel, url: str, server_pid: int, *, sequential_requests: int,
                     warmup_requests: int, warmup_s: float, step_s: float) -> RawPath:
    """The served check, then Redis PING, single transactions sequential and `spec.concurrency` in flight."""
    loaded_n = math.ceil(spec.max_txn_per_s * (_LEAD_S + warmup_s + step_s)) + spec.concurrency
    counts = [spec.check_transactions, warmup_requests, sequential_requests, loaded_n]
    started = time.perf_counter()
    frame = new_transactions(model, sum(counts), spec.seed + 1)
    payloads = raw_payloads(model.signature, frame, model.name)
    log.info("%d distinct transactions serialized in %.1f s", len(payloads), time.perf_counter() - started)
    edges = np.cumsum([0, *counts])
    check, warm, seq, loaded = (payloads[a:b] for a, b in zip(edges[:-1], edges[1:]))
    max_diff, flipped, response_bytes = check_raw_scores(url, model, frame[: counts[0]], check)
    ping = redis_ping_step(model.store_url, sequential_requests, warmup_requests)
    observe = Observer(url, server_pid, model.name)
    try:
        sequential = sequential_step("raw sequential", url, INFER_METHOD, warm, seq, sequential_requests, 1, observe)
        with LoadGenerator(url, {"raw": (loaded, response_bytes)}, 1, 1, observe) as generator:
            step, sent = closed_step(f"raw c{spec.concurrency}", generator, "h2", INFER_METHOD, "raw",
                                     spec.concurrency, 1, warmup_s, step_s)
    finally:
        observe.close()
    if sent > len(loaded):
        raise RequestFailedError(
            f"the {spec.concurrency}-in-flight step sent {sent:,} transactions but {len(loaded):,} distinct ones were "
            f"serialized (sized for {spec.max_txn_per_s:,} txn/s): some were sent twice and took the idempotent path; "
            "raise RawBenchSpec.max_txn_per_s (treeops bench serving --raw-max-txn-per-s)")
    return RawPath(model.name, model.booster.num_boosted_rounds(), model.history_features, model.backfill_rows,
                   model.backfill_s, model.backfill_rows_per_s, counts[0], max_diff, flipped, ping, sequential, step,
                   len(payloads))
