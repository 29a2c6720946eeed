"""The raw-transaction model's plan for treeops' C backend (`online.json`): contents, refusals, and its numpy
reading equal to the Polars features and the python-onnx raw graph (no Triton here)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import shutil
from collections.abc import Iterator

import mlflow
import numpy as np
import polars as pl
import pytest
import xgboost as xgb

from backends.online_history import AGGREGATES, SCRIPT, OnlineHistory, connect, late_us_of
from export.compiled_forest import COMPILED_FILE, compile_forest
from export.errors import ExportError, FeatureCompileError, UnsupportedModelError
from export.native_backend import require_hiredis
from export.native_online import ONLINE_FILE, online_plan, plan_features, read_online_plan, write_online_plan
from export.online import DEGRADED_OUTPUT, online_inputs, online_parameters
from export.pipeline import ExportResult, ExportSettings, export_model
from export.raw_graph import BUILDERS, Builder, compile_raw_model, feature_model, raw_feeds
from export.repository import ModelRepository
from export.targets import get_target
from export.triton_config import ServingSettings
from redis_fixtures import local_redis
from server.client import ScoringClient, load_features
from server.launcher import TritonServer
from test_raw_graph import _edge_transactions
from training.features import FRAUD_FEATURES, Feature, FittedFeatures
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace
from triton_fixtures import serving

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler (gcc) for forest.so")


@pytest.fixture(scope="module")
def setup() -> tuple[FittedFeatures, xgb.Booster, pl.DataFrame]:
    """A booster on generated rows' features (history included); test rows add edge transactions."""
    raw = generate_transactions(GenerateSpec(rows=6000, seed=12))
    fitted = FRAUD_FEATURES.fit(FRAUD_FEATURES.compute(raw.head(4000).lazy()))
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 5, "seed": 0},
                        xgb.DMatrix(fitted.matrix_raw(raw.head(4000)), label=raw["is_fraud"].head(4000).to_numpy(),
                                    feature_names=FRAUD_FEATURES.names), num_boost_round=40)
    return fitted, booster, pl.concat([raw.tail(2000).drop("is_fraud"), _edge_transactions()])


def _with(feature: Feature, fitted: FittedFeatures) -> FittedFeatures:
    features = tuple(feature if f.name == feature.name else f for f in FRAUD_FEATURES.features)
    if feature.name not in FRAUD_FEATURES.names:
        features = (*features, feature)
    return FittedFeatures(dataclasses.replace(FRAUD_FEATURES, features=features), fitted.vocabularies)


def test_the_plan_of_the_fraud_spec(setup):
    fitted, _, _ = setup
    plan = online_plan(fitted)
    assert [(f["name"], f["kind"]) for f in plan["fields"]] == [(r.name, r.dtype) for r in online_inputs(fitted)]
    assert {f["name"] for f in plan["fields"]} == set(FRAUD_FEATURES.raw_schema)
    params = online_parameters(fitted, "error")
    assert (plan["entity"], plan["time"], plan["transaction_id"]) == ("card_id", "timestamp", "transaction_id")
    assert plan["namespace"] == params["store_namespace"] == "treeops:card_transactions_v2:card_id"
    assert plan["values"] == plan["non_negative"] == params["non_negative_fields"].split(",") == ["amount"]
    thirty_days_us = 30 * 86_400 * 1_000_000
    assert plan["max_window_us"] == thirty_days_us
    assert plan["retention_us"] == thirty_days_us + fitted.spec.late_arrival_us
    assert plan["script"] == SCRIPT and plan["script_sha1"] == hashlib.sha1(SCRIPT.encode()).hexdigest()
    assert [f["name"] for f in plan["features"]] == FRAUD_FEATURES.names
    ops = {f["name"]: f for f in plan["features"]}
    assert ops["log_amount"] == {"name": "log_amount", "op": "log1p_clip0", "field": "amount"}
    assert ops["day_of_week"]["op"] == "iso_weekday" and ops["is_weekend"]["field"] == "timestamp"
    for name in FRAUD_FEATURES.categorical:
        assert ops[name] == {"name": name, "op": "category", "field": name,
                             "vocabulary": list(fitted.vocabularies[name])}
    for f in FRAUD_FEATURES.features:
        if f.history is not None:
            assert ops[f.name]["aggregate"] in AGGREGATES and ops[f.name]["window_us"] == f.history.window_us
            assert ops[f.name]["column"] == (1 if f.history.value == "amount" else 0)


def test_the_plan_file_is_sorted_json(setup, tmp_path):
    fitted, _, _ = setup
    path = write_online_plan(tmp_path, fitted)
    assert path.name == ONLINE_FILE and read_online_plan(tmp_path) == online_plan(fitted)
    assert list(json.loads(path.read_text())) == sorted(online_plan(fitted))


def test_a_stateless_raw_spec_is_refused_pointing_to_python_onnx(setup):
    fitted, _, _ = setup
    stateless = FittedFeatures(dataclasses.replace(FRAUD_FEATURES, features=tuple(
        f for f in FRAUD_FEATURES.features if f.history is None)), fitted.vocabularies)
    target = get_target("native-compiled")
    for refuse in (lambda: online_plan(stateless), lambda: target.require_feature_tensor(stateless)):
        with pytest.raises(UnsupportedModelError, match="python-onnx"):
            refuse()
    with pytest.raises(UnsupportedModelError, match="feature tensor.*python-onnx"):
        target.model_config("m", 4, 2, ServingSettings(), [1], {}, inputs=[])


def test_a_feature_without_a_native_op_is_refused_naming_it(setup, monkeypatch):
    fitted, _, _ = setup
    squared = Feature("amount_squared", pl.col("amount") ** 2, "amount squared")
    monkeypatch.setitem(BUILDERS, "amount_squared", Builder(squared.expr, BUILDERS["log_amount"].build))
    spec = _with(squared, fitted)
    feature_model(spec)  # the ONNX graph has a builder for it; the C backend has no op
    with pytest.raises(FeatureCompileError, match=r"'amount_squared'.*no op in treeops' C backend"):
        get_target("native-compiled").require_feature_tensor(spec)


def test_a_changed_definition_or_a_computed_category_is_refused(setup):
    fitted, _, _ = setup
    changed = Feature("log_amount", pl.col("amount").clip(lower_bound=1).log1p(), "changed")
    with pytest.raises(FeatureCompileError, match=r"log_amount.*update export/raw_graph.py BUILDERS"):
        online_plan(_with(changed, fitted))
    lowered = Feature("channel", pl.col("channel").str.to_lowercase(), "channel", categorical=True)
    with pytest.raises(FeatureCompileError, match=r"'channel'.*not a plain column"):
        online_plan(_with(lowered, fitted))


def test_two_time_fields_are_refused(setup):
    fitted, _, _ = setup
    spec = fitted.spec
    other = dataclasses.replace(spec.features[-1], history=dataclasses.replace(spec.features[-1].history, time="t2"))
    two = FittedFeatures(dataclasses.replace(spec, features=(*spec.features[:-1], other),
                                             raw_schema={**spec.raw_schema, "t2": pl.Datetime("us")}),
                         fitted.vocabularies)
    with pytest.raises(UnsupportedModelError, match=r"\['t2', 'timestamp'\].*one time field"):
        online_plan(two)


def test_plan_features_equal_polars_features_bit_for_bit(setup):
    fitted, _, test = setup
    got = plan_features(online_plan(fitted))(raw_feeds(fitted, test))
    expected = fitted.matrix_raw(test)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got, expected, equal_nan=True), np.argwhere(~((got == expected) | np.isnan(expected)))


def test_native_raw_scorer_equals_the_python_onnx_raw_graph_and_xgboost(setup, tmp_path):
    fitted, booster, test = setup
    compile_forest(booster, len(FRAUD_FEATURES.names), tmp_path / COMPILED_FILE)
    write_online_plan(tmp_path, fitted)
    feeds = raw_feeds(fitted, test)
    native = get_target("native-compiled").raw_scorer(tmp_path)(feeds)
    import onnxruntime as ort

    graph = ort.InferenceSession(compile_raw_model(fitted, booster).SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert native.shape == graph.shape == (test.height, 2)
    np.testing.assert_allclose(native, graph, rtol=0, atol=1e-6)
    np.testing.assert_allclose(native[:, 1], booster.inplace_predict(fitted.matrix_raw(test)), rtol=0, atol=1e-6)


def test_the_raw_transaction_config_answers_degraded_without_warmup(setup):
    fitted, _, _ = setup
    params = dict(online_parameters(fitted, "score_without_history"))
    inputs = [r.tensor_spec() for r in online_inputs(fitted)]
    serving = ServingSettings(warmup=True)
    cfg = get_target("native-compiled").model_config("m", len(fitted.spec.names), 2, serving, [3], params,
                                                     inputs=inputs)
    assert cfg.backend == "treeops_forest"
    assert [i.name for i in cfg.input] == [t.name for t in inputs]
    assert [o.name for o in cfg.output] == ["probabilities", DEGRADED_OUTPUT.name]
    assert not cfg.model_warmup
    assert {k: v.string_value for k, v in cfg.parameters.items() if k in params} == params
    assert "treeops_metrics" in cfg.parameters
    tensor = get_target("native-compiled").model_config("m", 12, 2, serving, [3], {})
    assert [o.name for o in tensor.output] == ["probabilities"] and tensor.model_warmup


def test_a_missing_hiredis_is_refused_with_the_package_to_install(tmp_path):
    with pytest.raises(ExportError, match=r"hiredis\.h is missing \(apt-get install libhiredis-dev\)"):
        require_hiredis(tmp_path / "hiredis.h")


def test_epoch_edges_follow_the_plan_ops():
    """Pre-1970 times floor (not truncate) into their day and hour."""
    t = pl.DataFrame({"timestamp": [dt.datetime(1969, 12, 31, 23, 30), dt.datetime(1970, 1, 1)]},
                     schema={"timestamp": pl.Datetime("us")})
    features = plan_features({"features": [{"name": "h", "op": "hour_of_day", "field": "timestamp"},
                                           {"name": "d", "op": "iso_weekday", "field": "timestamp"}]})
    got = features({"timestamp": t["timestamp"].dt.epoch("us").to_numpy()})
    assert got.tolist() == [[23.0, 3.0], [0.0, 4.0]]


# --- the raw-transaction model in the C backend, on a real Triton with a real Redis ---------------------------------

MODEL = "native_online"


@dataclasses.dataclass(frozen=True)
class Exported:
    ws: Workspace
    result: ExportResult
    fitted: FittedFeatures
    booster: xgb.Booster


@dataclasses.dataclass(frozen=True)
class Served:
    exported: Exported
    server: TritonServer
    store_url: str


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A history-feature model exported with --target native-compiled --raw-inputs (through the parity gate)."""
    before = mlflow.get_tracking_uri()
    ws = Workspace(tmp_path_factory.mktemp("native-online"))
    data = write_transactions(generate_transactions(GenerateSpec(rows=8_000, seed=5)), ws.data_dir / "t.parquet")
    try:
        train_and_register(data, "is_fraud", MODEL, params=TrainParams(num_boost_round=30),
                           tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
        mlflow.set_tracking_uri(ws.tracking_uri)
        result = export_model(MODEL, ModelRepository(ws.model_repository),
                              settings=ExportSettings(target="native-compiled", raw_inputs=True))
        booster = mlflow.xgboost.load_model(f"models:/{MODEL}/1")
    finally:
        mlflow.set_tracking_uri(before)
    return Exported(ws, result, load_features(result.version_dir), booster)


@pytest.fixture(scope="module")
def served(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`exported` on a real Triton with a real, empty Redis."""
    with local_redis(tmp_path_factory.mktemp("redis")) as store, \
            serving(exported.ws, models=[MODEL], online_store_url=store.url) as server:
        yield Served(exported, server, store.url)


@pytest.fixture
def client(served: Served) -> Iterator[ScoringClient]:
    connect(served.store_url).flushall()
    with ScoringClient(served.server.settings.grpc_url, MODEL, retries=0) as c:
        yield c


def _stream(rows: int, seed: int) -> pl.DataFrame:
    """Unseen transactions in time order (about 40 per card, some with equal timestamps)."""
    raw = generate_transactions(GenerateSpec(rows=rows, seed=seed), first_id=60_000_000).drop("is_fraud")
    return raw.sort("timestamp", "transaction_id")


def test_the_export_passes_the_gate_on_the_plan_and_records_online_json(exported):
    result = exported.result
    assert result.parity is not None and result.parity.passed and result.parity.rows > 0, result.parity
    meta = json.loads((result.version_dir / "treeops.json").read_text())
    assert meta["target"] == "native-compiled" and meta["raw_inputs"] is True
    assert {ONLINE_FILE, COMPILED_FILE, "libtriton_treeops_forest.so"} <= set(meta["files"])
    assert read_online_plan(result.version_dir) == online_plan(exported.fitted)


@pytest.mark.triton
def test_the_served_signature_is_the_raw_fields_and_the_degraded_flag(served, client):
    signature = client.served_signature()
    assert [t.name for t in signature.inputs] == [r.name for r in online_inputs(served.exported.fitted)]
    assert [t.name for t in signature.outputs] == ["probabilities", DEGRADED_OUTPUT.name]


@pytest.mark.triton
def test_one_transaction_per_call_scores_like_offline_and_stores_what_online_history_reads(served, client):
    stream = _stream(rows=300, seed=123)
    scored = [client.score_transactions(stream.slice(i, 1)) for i in range(stream.height)]
    served_scores = np.concatenate([s.positive for s in scored])
    expected = served.exported.booster.inplace_predict(served.exported.fitted.matrix_raw(stream))
    np.testing.assert_allclose(served_scores, expected, rtol=0, atol=1e-5)
    assert np.array_equal(served_scores >= 0.5, expected >= 0.5)
    described = served.exported.fitted.to_dict()
    late_us = late_us_of(described)
    history = OnlineHistory(connect(served.store_url), served.store_url, online_plan(served.exported.fitted)["namespace"],
                            described["features"], late_us=late_us)
    # the store keeps each card's idempotency records for its longest window + late_us: read back the transactions
    # within late_us of their card's newest one, which the Python store client must see as retries
    offline = served.exported.fitted.encode(served.exported.fitted.spec.compute(stream.lazy())).collect()
    recent = (pl.col("timestamp").max().over("card_id") - pl.col("timestamp")).dt.total_microseconds() < late_us
    kept = stream.with_columns(recent.alias("recent"))["recent"].to_numpy()
    tail = stream.filter(pl.Series(kept))
    try:
        again = history.features(tail["card_id"].to_numpy(), tail["timestamp"].dt.epoch("us").to_numpy(),
                                 {"amount": tail["amount"].to_numpy()}, tail["transaction_id"].to_numpy(), update=False)
    finally:
        history.close()
    assert np.isfinite(again[:, history.names.index("seconds_since_prev_card_txn")]).sum() >= 5  # non-empty histories
    np.testing.assert_array_equal(again.astype(np.float32), offline.select(history.names).to_numpy()[kept])


@pytest.mark.triton
def test_a_retry_and_a_read_only_call_change_nothing(served, client):
    stream = _stream(rows=200, seed=9)
    first = client.score_transactions(stream.head(150)).positive
    keys = sorted(connect(served.store_url).scan_iter("*"))
    before = {k: connect(served.store_url).dump(k) for k in keys}
    retry = client.score_transactions(stream.slice(140, 1)).positive
    peek = client.score_transactions(stream.slice(150, 1), read_only=True).positive
    assert retry[0] == first[140]
    assert {k: connect(served.store_url).dump(k) for k in sorted(connect(served.store_url).scan_iter("*"))} == before
    assert client.score_transactions(stream.slice(150, 1)).positive[0] == peek[0]


@pytest.mark.triton
def test_one_request_of_a_cards_shuffled_transactions_applies_them_in_time_order(served, client):
    stream = _stream(rows=400, seed=21)
    card = stream.filter(pl.col("card_id") == stream["card_id"][0]).head(12)
    shuffled = card.sample(fraction=1.0, shuffle=True, seed=3)
    got = dict(zip(shuffled["transaction_id"].to_list(), client.score_transactions(shuffled).positive.tolist()))
    expected = dict(zip(card["transaction_id"].to_list(),
                        served.exported.booster.inplace_predict(served.exported.fitted.matrix_raw(card)).tolist()))
    assert got == pytest.approx(expected, abs=1e-5)
