"""Raw-input ONNX graph: features and scores equal Polars features + xgboost on every row."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import onnxruntime as ort
import polars as pl
import pytest
import xgboost as xgb
from tritonclient.grpc import model_config_pb2 as mc

from export.errors import FeatureCompileError
from export.onnx_convert import OUTPUT_NAME
from export.raw_graph import (
    BUILDERS, TIMESTAMP_INPUT, compile_raw_model, feature_model, raw_feeds, raw_inputs,
)
from export.triton_config import ServingSettings, TensorSpec, model_config, parse, render
from training.features import FRAUD_FEATURES, RAW_SCHEMA, Feature, FittedFeatures
from training.generate import GenerateSpec, generate_transactions


def _edge_transactions() -> pl.DataFrame:
    """Rows the generator never makes: odd amounts, unseen/empty/null categories, pre-1970 and day edges."""
    stamps = [dt.datetime(1970, 1, 1), dt.datetime(1969, 12, 31, 23, 59, 59), dt.datetime(2026, 1, 3, 23, 59, 59),
              dt.datetime(2026, 1, 4, 0, 0, 0), dt.datetime(2026, 1, 5, 0, 0, 0), dt.datetime(1901, 3, 9, 12, 30),
              dt.datetime(2099, 12, 31, 23, 0, 1), dt.datetime(2026, 2, 28, 11, 59, 59)]
    amounts = [0.0, -0.0, -12.5, None, float("nan"), float("inf"), 1e12, 0.01]
    n = len(stamps)
    return pl.DataFrame(
        {
            "transaction_id": np.arange(10_000_000, 10_000_000 + n),
            "card_id": [999_999] * (n // 2) + [5] * (n - n // 2),
            "timestamp": stamps,
            "amount": amounts,
            "merchant_category": ["grocery", "no-such-merchant", "", None, "travel", "jewelry", "Grocery", "fuel"],
            "country": ["US", "ZZ", "GB", None, "", "NG", "us", "RU"],
            "channel": ["pos", "online", "atm", "kiosk", None, "", "POS", "online"],
        },
        schema=RAW_SCHEMA,
    )


@pytest.fixture(scope="module")
def setup() -> tuple[FittedFeatures, xgb.Booster, pl.DataFrame]:
    """A booster trained on generated rows; the test rows add unseen and edge transactions."""
    raw = generate_transactions(GenerateSpec(rows=6000, seed=11))
    fitted = FRAUD_FEATURES.fit(FRAUD_FEATURES.compute(raw.head(4000).lazy()))
    x = fitted.matrix_raw(raw.head(4000))
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 5, "seed": 0},
                        xgb.DMatrix(x, label=raw["is_fraud"].head(4000).to_numpy(), feature_names=FRAUD_FEATURES.names),
                        num_boost_round=40)
    test = pl.concat([raw.tail(2000).drop("is_fraud"), _edge_transactions()])
    return fitted, booster, test


def _run(model, feeds) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_graph_features_equal_polars_features_bit_for_bit(setup):
    fitted, _, test = setup
    got = _run(feature_model(fitted), raw_feeds(fitted, test))
    expected = fitted.matrix_raw(test)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got, expected, equal_nan=True), np.argwhere(~((got == expected) | np.isnan(expected)))


def test_raw_graph_scores_equal_features_plus_xgboost_on_every_row(setup):
    fitted, booster, test = setup
    scores = _run(compile_raw_model(fitted, booster), raw_feeds(fitted, test))
    expected = booster.inplace_predict(fitted.matrix_raw(test))
    assert scores.shape == (test.height, 2)
    np.testing.assert_allclose(scores[:, 1], expected, rtol=0, atol=1e-6)
    assert np.array_equal(scores[:, 1] >= 0.5, expected >= 0.5)


def test_inputs_come_from_the_spec(setup):
    fitted, _, _ = setup
    inputs = {r.name: r for r in raw_inputs(fitted)}
    stateful = [f.name for f in FRAUD_FEATURES.features if f.stateful]
    assert stateful == ["card_txn_count_1h", "card_txn_count_24h", "card_amount_sum_24h",
                        "seconds_since_prev_card_txn", "amount_to_card_mean_30d"]
    assert [n for n, r in inputs.items() if r.stateful] == stateful
    assert {n: r.dtype for n, r in inputs.items() if not r.stateful} == {
        "amount": "double", TIMESTAMP_INPUT: "int64",
        "merchant_category": "string", "country": "string", "channel": "string"}
    assert set(BUILDERS) | set(FRAUD_FEATURES.categorical) | set(stateful) == set(FRAUD_FEATURES.names)


def test_raw_inputs_make_a_valid_triton_config(setup):
    fitted, booster, _ = setup
    specs = [r.tensor_spec() for r in raw_inputs(fitted)]
    cfg = model_config("fraud_raw", inputs=specs, outputs=[TensorSpec(OUTPUT_NAME, (2,))], serving=ServingSettings(),
                       versions=[1], backend="onnxruntime", platform="onnxruntime_onnx")
    back = parse(render(cfg))
    assert {i.name: mc.DataType.Name(i.data_type) for i in back.input} == {
        "amount": "TYPE_FP64", TIMESTAMP_INPUT: "TYPE_INT64", "merchant_category": "TYPE_STRING",
        "country": "TYPE_STRING", "channel": "TYPE_STRING", "card_txn_count_1h": "TYPE_FP32",
        "card_txn_count_24h": "TYPE_FP32", "card_amount_sum_24h": "TYPE_FP32",
        "seconds_since_prev_card_txn": "TYPE_FP32", "amount_to_card_mean_30d": "TYPE_FP32"}
    model = compile_raw_model(fitted, booster)
    assert [i.name for i in model.graph.input] == [i.name for i in back.input]


def _spec_with(feature: Feature):
    features = tuple(feature if f.name == feature.name else f for f in FRAUD_FEATURES.features)
    if feature.name not in FRAUD_FEATURES.names:
        features = (*features, feature)
    return FittedFeatures(dataclasses.replace(FRAUD_FEATURES, features=features),
                          {c: ("a", "b") for c in FRAUD_FEATURES.categorical})


def test_a_changed_feature_definition_fails_loudly():
    changed = Feature("log_amount", pl.col("amount").clip(lower_bound=1).log1p(), "changed")
    with pytest.raises(FeatureCompileError, match=r"log_amount.*update export/raw_graph.py BUILDERS"):
        feature_model(_spec_with(changed))


def test_a_feature_without_builder_fails_loudly():
    unknown = Feature("minute", pl.col("timestamp").dt.minute(), "minute of the hour")
    with pytest.raises(FeatureCompileError, match=r"'minute'.*has no ONNX builder"):
        feature_model(_spec_with(unknown))
