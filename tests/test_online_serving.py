"""The raw-transaction model served by a real Triton with its history in a real Redis.

Every score is checked against offline Polars features + xgboost over the same stream (the store
starts empty, so a transaction's history is the stream's earlier transactions of its card).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import tritonclient.grpc as grpcclient
import xgboost as xgb
from tritonclient.utils import InferenceServerException

from backends.online_history import connect
from conftest import TREEOPS
from export.online import DEGRADED_DOC, online_inputs
from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from online_store.redis_server import LocalRedis
from redis_fixtures import local_redis
from server.admin import GRPC_RESTRICTED_PREFIX
from server.client import ScoringClient, load_features
from server.errors import ScoringError
from server.launcher import free_port
from training.features import FittedFeatures
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace
from triton_fixtures import serving

pytestmark = [pytest.mark.triton]

MODEL = "online"
LENIENT = "online_lenient"  # the same version, on_store_unavailable = score_without_history
BATCHED = "online_batched"  # the same version; its dynamic batcher waits BATCH_WAIT_US, so a burst is one execute
BATCH_WAIT_US = 1_000_000


@dataclass(frozen=True)
class Exported:
    ws: Workspace
    features: FittedFeatures
    booster: xgb.Booster
    version_dir: Path


#: The targets that serve the raw-transaction model: treeops' C backend (hiredis) and the Python backend.
ONLINE_TARGETS = ("native-compiled", "python-onnx")
#: As test parameters: the python-onnx copies of the long scenarios run in `make test-all` only (CI keeps the
#: --raw-inputs default's, and tests/test_prediction_log.py serves both targets).
TARGET_PARAMS = (pytest.param("native-compiled"), pytest.param("python-onnx", marks=pytest.mark.long))


def export_online(ws: Workspace, target: str | None = None) -> Exported:
    """A model trained on history features in `ws`, exported with --raw-inputs as `online` (parity gate passed)
    by `target` (None: the --raw-inputs default)."""
    before = mlflow.get_tracking_uri()
    data = write_transactions(generate_transactions(GenerateSpec(rows=8_000, seed=5)), ws.data_dir / "t.parquet")
    try:
        train_and_register(data, "is_fraud", MODEL, params=TrainParams(num_boost_round=30),
                           tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
        mlflow.set_tracking_uri(ws.tracking_uri)
        result = export_model(MODEL, ModelRepository(ws.model_repository), settings=ExportSettings(raw_inputs=True,
                                                                                                target=target))
        booster = mlflow.xgboost.load_model(f"models:/{MODEL}/1")
    finally:
        mlflow.set_tracking_uri(before)
    assert result.parity is not None and result.parity.passed, result.parity
    return Exported(ws, load_features(result.version_dir), booster, result.version_dir)


def copy_model(exported: Exported, repository: Path, name: str, policy: str = "error", wait_us: int = 0) -> None:
    """The exported `online` model served as `repository/name`, with config parameter on_store_unavailable `policy`
    and the dynamic batcher's max_queue_delay_microseconds `wait_us`."""
    shutil.copytree(exported.ws.model_repository / MODEL, repository / name)
    config = (repository / name / "config.pbtxt").read_text().replace(f'name: "{MODEL}"', f'name: "{name}"')
    default = 'key: "on_store_unavailable"\n  value {\n    string_value: "error"'
    assert default in config and "dynamic_batching {\n}" in config, config
    config = config.replace(default, default.replace('"error"', f'"{policy}"'))
    config = config.replace("dynamic_batching {\n}", f"dynamic_batching {{\n  max_queue_delay_microseconds: {wait_us}\n}}")
    (repository / name / "config.pbtxt").write_text(config)


@pytest.fixture(scope="module", params=TARGET_PARAMS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """`export_online` by each target, plus a lenient copy (on_store_unavailable = score_without_history) and a
    batched one."""
    exported = export_online(Workspace(tmp_path_factory.mktemp("online")), request.param)
    copy_model(exported, exported.ws.model_repository, LENIENT, "score_without_history")
    copy_model(exported, exported.ws.model_repository, BATCHED, wait_us=BATCH_WAIT_US)
    return exported


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with local_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def triton(exported: Exported, store: LocalRedis):
    with serving(exported.ws, models=[MODEL, LENIENT, BATCHED], online_store_url=store.url, exit_timeout_s=5) as server:
        yield server


@pytest.fixture
def client(triton, store: LocalRedis) -> Iterator[ScoringClient]:
    connect(store.url).flushall()
    with ScoringClient(triton.settings.grpc_url, MODEL, retries=0) as c:
        yield c


def _stream(rows: int = 400, seed: int = 123) -> pl.DataFrame:
    """Unseen transactions in time order (about 40 per card, some with equal timestamps)."""
    raw = generate_transactions(GenerateSpec(rows=rows, seed=seed), first_id=50_000_000).drop("is_fraud")
    return raw.sort("timestamp", "transaction_id")


def _offline(exported: Exported, stream: pl.DataFrame) -> np.ndarray:
    """Polars features + xgboost, each row's history being the stream's earlier transactions of its card."""
    return exported.booster.inplace_predict(exported.features.matrix_raw(stream))


def _state(url: str) -> dict:
    """Every key of the store with its content."""
    client = connect(url)
    out = {}
    for key in client.scan_iter("*"):
        kind = client.type(key)
        out[key] = client.zrange(key, 0, -1, withscores=True) if kind == b"zset" else client.hgetall(key)
    return out


def test_inputs_are_the_raw_fields(exported: Exported, client: ScoringClient, triton):
    signature = client.served_signature()
    assert {t.name: t.datatype for t in signature.inputs} == {
        "transaction_id": "INT64", "card_id": "INT64", "timestamp": "INT64", "amount": "FP64",
        "merchant_category": "BYTES", "country": "BYTES", "channel": "BYTES"}
    assert [r.name for r in online_inputs(exported.features)] == [t.name for t in signature.inputs]
    assert [t.name for t in signature.outputs] == ["probabilities", "treeops_degraded"]
    with _raw_client(triton) as raw:  # the flag is an output (2.51's Python backend sets no response parameters)
        parameters = raw.get_model_config(MODEL, as_json=True)["config"]["parameters"]
    assert parameters["treeops_degraded_output"]["string_value"] == DEGRADED_DOC


def test_one_transaction_per_call_scores_like_offline_features_plus_xgboost(exported, client, store):
    stream = _stream()
    served = np.concatenate([client.score_transactions(stream.slice(i, 1)).positive for i in range(stream.height)])
    expected = _offline(exported, stream)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
    assert np.array_equal(served >= 0.5, expected >= 0.5)
    before = _state(store.url)
    last = stream.height - 3  # a retry (within the store's late-arrival day) of a transaction already scored
    again = client.score_transactions(stream.slice(last, 1)).positive
    assert again[0] == served[last]
    assert _state(store.url) == before


def _by_id(stream: pl.DataFrame, scores: np.ndarray) -> dict[int, float]:
    return dict(zip(stream["transaction_id"].to_list(), scores.tolist(), strict=True))


def test_read_only_scores_without_changing_the_state(exported, client, store):
    stream = _stream(rows=200, seed=9)
    client.score_transactions(stream.head(150))
    before = _state(store.url)
    peek = client.score_transactions(stream.slice(150, 1), read_only=True).positive
    assert _state(store.url) == before
    scored = client.score_transactions(stream.slice(150, 1)).positive  # the same transaction, now recorded
    assert peek[0] == scored[0]
    assert _state(store.url) != before


def test_one_request_of_several_transactions_of_a_card_applies_them_in_time_order(exported, client):
    stream = _stream(rows=400, seed=21)
    card = stream.filter(pl.col("card_id") == stream["card_id"][0]).head(12)
    shuffled = card.sample(fraction=1.0, shuffle=True, seed=3)
    served = client.score_transactions(shuffled).positive
    assert _by_id(shuffled, served) == pytest.approx(_by_id(card, _offline(exported, card)), abs=1e-5)


def _raw_client(triton) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(triton.settings.grpc_url)


RAW_TYPES = {"transaction_id": "INT64", "card_id": "INT64", "timestamp": "INT64", "amount": "FP64",
             "merchant_category": "BYTES", "country": "BYTES", "channel": "BYTES"}


def _inputs(row: dict, **override: tuple[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """Plain tritonclient inputs of one transaction (dict of raw fields; timestamp in epoch µs)."""
    inputs = []
    for name, datatype in RAW_TYPES.items():
        datatype, values = override.get(name, (datatype, None))
        if values is None:
            values = np.array([[row[name]]], dtype=object if datatype == "BYTES" else NUMPY[datatype])
        inp = grpcclient.InferInput(name, list(values.shape), datatype)
        inp.set_data_from_numpy(values)
        inputs.append(inp)
    return inputs


NUMPY = {"INT64": np.int64, "FP64": np.float64, "FP32": np.float32}
TXN = {"transaction_id": 7, "card_id": 42, "timestamp": 1_767_225_600_000_000, "amount": 12.5,
       "merchant_category": "grocery", "country": "US", "channel": "pos"}


@pytest.mark.parametrize(("override", "named"), [
    ({"amount": ("FP64", np.array([[12.5], [-3.0], [1.0]]))}, "'amount' row 1"),
    ({"amount": ("FP64", np.array([[float("nan")]]))}, "'amount' row 0"),
    ({"timestamp": ("INT64", np.array([[1_767_225_600]]))}, "'timestamp' row 0"),  # seconds, not µs
    ({"amount": ("FP32", np.array([[12.5]], dtype=np.float32))}, "amount"),  # wrong datatype (Triton refuses)
])
def test_bad_input_is_refused_naming_field_and_row_and_writes_nothing(client, store, triton, override, named):
    rows = len(next(iter(override.values()))[1])
    full = {k: (d, np.repeat(np.array([[TXN[k]]], dtype=object if d == "BYTES" else NUMPY[d]), rows, axis=0))
            for k, d in (("transaction_id", "INT64"), ("card_id", "INT64"), ("timestamp", "INT64"),
                         ("merchant_category", "BYTES"), ("country", "BYTES"), ("channel", "BYTES"))}
    if rows > 1:
        full["transaction_id"] = ("INT64", np.arange(rows, dtype=np.int64).reshape(-1, 1))
    with _raw_client(triton) as raw, pytest.raises(InferenceServerException) as err:
        raw.infer(MODEL, _inputs(TXN, **{**full, **override}))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert named in err.value.message()
    assert _state(store.url) == {}


def test_a_missing_field_is_refused_naming_it(client, store, triton):
    inputs = [i for i in _inputs(TXN) if i.name() != "country"]
    with _raw_client(triton) as raw, pytest.raises(InferenceServerException) as err:
        raw.infer(MODEL, inputs)
    assert "country" in err.value.message()
    assert _state(store.url) == {}


def _frame_inputs(frame: pl.DataFrame, **override: np.ndarray) -> list[grpcclient.InferInput]:
    """Plain tritonclient inputs of a frame of transactions, one row each ([n, 1]); `override` replaces columns."""
    epoch = frame.with_columns(pl.col("timestamp").dt.epoch("us"))
    inputs = []
    for name, datatype in RAW_TYPES.items():
        values = override.get(name)
        if values is None:
            values = np.array(epoch[name].to_list(), dtype=object if datatype == "BYTES" else NUMPY[datatype])
        values = values.reshape(-1, 1)
        inp = grpcclient.InferInput(name, list(values.shape), datatype)
        inp.set_data_from_numpy(values)
        inputs.append(inp)
    return inputs


def _burst(triton, requests: list[tuple[list[grpcclient.InferInput], bool]]) -> tuple[list, int]:
    """Send every (inputs, read_only) request to BATCHED at once: (each one's result or InferenceServerException, in
    order; how many executions Triton ran for them: 1 when its batcher put them all in one execute)."""
    results: list = [None] * len(requests)
    done = [threading.Event() for _ in requests]

    def answered(k: int, result, error) -> None:
        results[k] = error if error is not None else result
        done[k].set()

    admin = {GRPC_RESTRICTED_PREFIX + triton.settings.admin_header: triton.settings.admin_key.get_secret_value()}
    with _raw_client(triton) as raw:
        before = raw.get_inference_statistics(BATCHED, headers=admin).model_stats[0].execution_count
        for k, (inputs, read_only) in enumerate(requests):
            raw.async_infer(BATCHED, inputs, functools.partial(answered, k),
                            parameters={"treeops_read_only": True} if read_only else None)
        assert all(d.wait(30) for d in done), "a request of the burst got no answer in 30 s"
        after = raw.get_inference_statistics(BATCHED, headers=admin).model_stats[0].execution_count
    return results, after - before


def test_one_execute_of_requests_of_several_cards_applies_every_row_in_time_order(exported, client, store, triton):
    """Six requests of three cards in one execute, each card's rows spread over several requests and no request in
    time order, plus a read-only one in the middle of a card's rows: every row sees exactly its card's earlier rows
    of the batch that update, the read-only one changes nothing."""
    stream = _stream(rows=400, seed=81)
    cards = stream["card_id"].unique(maintain_order=True).head(3).to_list()
    rows = stream.filter(pl.col("card_id").is_in(cards)).head(19)
    peek = rows.filter(pl.col("card_id") == cards[0]).slice(2, 1)
    updates = rows.join(peek, on="transaction_id", how="anti").sort("timestamp", "transaction_id")
    assert (updates.filter(pl.col("card_id") == cards[0])["timestamp"] > peek["timestamp"][0]).any()
    parts = [updates.reverse().gather_every(6, offset=k) for k in range(6)]
    assert sum(cards[0] in p["card_id"].to_list() for p in parts) >= 2  # one card's rows across requests
    results, executions = _burst(triton, [(_frame_inputs(p), False) for p in parts] + [(_frame_inputs(peek), True)])
    assert executions == 1
    expected = _by_id(updates, _offline(exported, updates))
    for part, result in zip(parts, results):
        assert _by_id(part, result.as_numpy("probabilities")[:, 1]) == pytest.approx(
            {k: expected[k] for k in part["transaction_id"].to_list()}, abs=1e-5)
        assert not result.as_numpy("treeops_degraded").any()
    with_peek = updates.vstack(peek).sort("timestamp", "transaction_id")
    want = _by_id(with_peek, _offline(exported, with_peek))[peek["transaction_id"][0]]
    assert results[-1].as_numpy("probabilities")[0, 1] == pytest.approx(want, abs=1e-5)
    records = {f for key, v in _state(store.url).items() if key.endswith(b":h") for f in v}
    assert f"t:{peek['transaction_id'][0]}".encode() not in records
    assert {f"t:{i}".encode() for i in updates["transaction_id"].to_list()} <= records


def test_a_bad_request_in_a_batch_is_refused_alone_and_writes_nothing(exported, client, store, triton):
    stream = _stream(rows=400, seed=83)
    card = stream["card_id"][0]
    good = stream.filter(pl.col("card_id") == card).head(4)
    bad = stream.filter(pl.col("card_id") != card).head(2)
    amounts = bad["amount"].to_numpy().copy()
    amounts[1] = -3.0
    results, executions = _burst(triton, [(_frame_inputs(good.head(2)), False),
                                          (_frame_inputs(bad, amount=amounts), False),
                                          (_frame_inputs(good.tail(2)), False)])
    assert executions == 1
    assert isinstance(results[1], InferenceServerException)
    assert results[1].status() == "StatusCode.INVALID_ARGUMENT" and "'amount' row 1" in results[1].message()
    served = np.concatenate([results[0].as_numpy("probabilities")[:, 1], results[2].as_numpy("probabilities")[:, 1]])
    np.testing.assert_allclose(served, _offline(exported, good), rtol=0, atol=1e-5)
    assert {key.split(b"{")[1].split(b"}")[0] for key in _state(store.url)} == {str(card).encode()}


def test_plain_tritonclient_and_kserve_json_score_like_offline(exported, client, triton):
    """The README's calls: tritonclient without treeops code, and `curl` (here urllib) with KServe v2 JSON."""
    stream = _stream(rows=200, seed=33)
    card = stream.filter(pl.col("card_id") == stream["card_id"][0]).head(4)
    expected = _offline(exported, card)
    rows = card.with_columns(pl.col("timestamp").dt.epoch("us")).to_dicts()
    version = exported.version_dir.name
    with _raw_client(triton) as raw:
        answer = raw.infer(MODEL, _inputs(rows[0]))
        assert answer.get_response().model_version == version
        first = answer.as_numpy("probabilities")[0, 1]
        second = raw.infer(MODEL, _inputs(rows[1])).as_numpy("probabilities")[0, 1]
    body = {"inputs": [
        {"name": k, "shape": [1, 1], "datatype": d, "data": [rows[2][k]]}
        for k, d in (("transaction_id", "INT64"), ("card_id", "INT64"), ("timestamp", "INT64"), ("amount", "FP64"),
                     ("merchant_category", "BYTES"), ("country", "BYTES"), ("channel", "BYTES"))]}
    request = urllib.request.Request(f"http://{triton.settings.http_url}/v2/models/{MODEL}/infer",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        answer = json.loads(resp.read())
    outputs = {o["name"]: o for o in answer["outputs"]}
    third = outputs["probabilities"]["data"][1]
    assert answer["model_version"] == version
    assert outputs["treeops_degraded"]["data"] == [False]
    body["parameters"] = {"treeops_read_only": True}
    body["inputs"] = [dict(i, data=[rows[3][i["name"]]]) for i in body["inputs"]]
    request = urllib.request.Request(request.full_url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        fourth = {o["name"]: o for o in json.loads(resp.read())["outputs"]}["probabilities"]["data"][1]
    np.testing.assert_allclose([first, second, third, fourth], expected, rtol=0, atol=1e-5)


def _metric(triton, name: str) -> float:
    with urllib.request.urlopen(triton.settings.metrics_url, timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{")
               and f'model="{LENIENT}"' in line)


def test_store_down_is_unavailable_naming_the_url_then_recovers_with_state_intact(exported, client, store, triton):
    stream = _stream(rows=200, seed=41)
    served = client.score_transactions(stream.head(100)).positive
    time.sleep(1.5)  # appendfsync everysec: what a crash may lose
    before = _state(store.url)
    store.kill()
    try:
        with pytest.raises(ScoringError) as err:
            client.score_transactions(stream.slice(100, 1))
        assert "UNAVAILABLE" in str(err.value) and store.url in str(err.value)
        with ScoringClient(triton.settings.grpc_url, LENIENT, retries=0) as lenient:
            count = _metric(triton, "treeops_degraded_answers_total")
            degraded = lenient.score_transactions(stream.slice(100, 2))
            assert degraded.degraded.tolist() == [True, True]
            assert degraded.model_version == exported.version_dir.name
            assert _metric(triton, "treeops_degraded_answers_total") == count + 1  # one answer, two rows
            no_history = exported.features.matrix_raw(stream.slice(100, 2))
            no_history[:, [i for i, f in enumerate(exported.features.spec.features) if f.stateful]] = np.nan
            np.testing.assert_allclose(degraded.positive, exported.booster.inplace_predict(no_history), atol=1e-5)
    finally:
        store.start()
    assert _state(store.url) == before
    rest = client.score_transactions(stream.slice(100))
    assert not rest.degraded.any()
    np.testing.assert_allclose(np.concatenate([served, rest.positive]), _offline(exported, stream), atol=1e-5)


def test_two_tritons_on_one_redis_give_the_offline_answers_to_an_interleaved_stream(exported, client, store, triton):
    stream = _stream(rows=300, seed=55)
    with serving(exported.ws, exported.ws.reports_dir / "triton-b.log", models=[MODEL],
                 online_store_url=store.url, exit_timeout_s=5) as other:
        with ScoringClient(other.settings.grpc_url, MODEL, retries=0) as second:
            served = [(client if i % 2 else second).score_transactions(stream.slice(i, 1)).positive[0]
                      for i in range(stream.height)]
    np.testing.assert_allclose(served, _offline(exported, stream), rtol=0, atol=1e-5)


def _redis_processes(directory: Path) -> list[int]:
    """Pids of processes working in `directory` (redis-server chdirs into its --dir and retitles itself)."""
    pids = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if cwd.resolve() == directory.resolve():
                pids.append(int(cwd.parent.name))
        except OSError:
            continue
    return pids


def test_serve_without_a_store_url_runs_a_local_redis_in_the_workspace_while_serving(exported, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(exported.ws.model_repository, root / "model_repository")
    shutil.copy2(exported.ws.root / "mlflow.db", root / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if k not in {"TREEOPS_ONLINE_STORE_URL", "MLFLOW_TRACKING_URI"}}
    ports = [arg for flag in ("--grpc-port", "--http-port", "--metrics-port") for arg in (flag, str(free_port()))]
    serve = subprocess.Popen([TREEOPS, "serve", *ports, "--insecure-admin", "--json", "--workspace", str(root)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = serve.stdout.readline()
        assert line, f"serve exited {serve.wait()}: {serve.stderr.read()[-2000:]}"
        ready = json.loads(line)
        stream = _stream(rows=100, seed=61).head(3)
        with ScoringClient(ready["grpc_url"], MODEL, retries=0) as c:
            served = c.score_transactions(stream).positive
        np.testing.assert_allclose(served, _offline(exported, stream), atol=1e-5)
        assert _redis_processes(root / "online_store")
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, serve.stderr.read()[-2000:]
    assert not _redis_processes(root / "online_store")
    assert list((root / "online_store").rglob("*.aof*")), "the local store keeps its state (AOF) in the workspace"


def test_a_store_url_password_never_reaches_the_client(exported, store):
    down = f"redis://:secret@127.0.0.1:{free_port()}/0"
    with serving(exported.ws, exported.ws.reports_dir / "triton-secret.log", models=[MODEL],
                 online_store_url=down, exit_timeout_s=5) as other:
        with ScoringClient(other.settings.grpc_url, MODEL, retries=0) as c:
            with pytest.raises(ScoringError) as err:
                c.score_transactions(_stream(rows=100, seed=71).head(1))
    message = str(err.value)
    assert "UNAVAILABLE" in message and down.replace("secret", "***") in message and "secret" not in message
