"""Property tests: ONNX Runtime scores like xgboost on NaN, +/-inf, thresholds +/- one ulp and extremes.

Findings pinned here (xgboost 3.2, onnxruntime 1.32, onnxmltools 1.16):
- a value exactly at a split threshold goes right in both (the test is `x < threshold`);
- +inf is an ordinary number in both: it goes right even where the missing-value default is left,
  -inf goes left; only NaN takes the default branch (xgboost.DMatrix refuses inf, inplace_predict
  accepts it);
- multi:softmax boosters converted as they are give raw margins as "probabilities": to_onnx
  converts them as multi:softprob.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import xgboost as xgb
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from export.errors import ParityError
from export.onnx_convert import OUTPUT_NAME, to_onnx
from export.parity import check_parity, gate_rows, property_rows, require, split_thresholds

N_FEATURES = 5
OBJECTIVES = {
    "binary:logistic": {},
    "multi:softprob": {"num_class": 3},
    "multi:softmax": {"num_class": 3},
    "reg:squarederror": {},
}
SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, float(np.finfo(np.float32).max), -float(np.finfo(np.float32).max),
            float(np.finfo(np.float32).smallest_subnormal), 2.0**24]


def _train(objective: str, rounds: int = 25, max_depth: int = 4) -> xgb.Booster:
    rng = np.random.default_rng(42)
    x = rng.normal(size=(1500, N_FEATURES)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan  # so that default directions go both ways
    a, b = np.nan_to_num(x[:, 0], nan=-1.0), np.nan_to_num(x[:, 1], nan=1.0)
    if objective.startswith("multi"):
        y = (a > 0).astype(int) + (b > 0.5)
    elif objective.startswith("reg"):
        y = 50 * a + 10 * b + rng.normal(size=len(a))
    else:
        y = (a + 0.5 * b + rng.normal(scale=0.3, size=len(a)) > 0).astype(int)
    params = {"objective": objective, "max_depth": max_depth, "seed": 0, **OBJECTIVES.get(objective, {})}
    return xgb.train(params, xgb.DMatrix(x, label=y, feature_names=[f"c{i}" for i in range(N_FEATURES)]), rounds)


class Model:
    """A booster, its ONNX Runtime scorer and a pool of boundary values (thresholds and their ulp neighbours)."""

    def __init__(self, objective: str) -> None:
        self.booster = _train(objective)
        session = ort.InferenceSession(to_onnx(self.booster, N_FEATURES).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        self.score = lambda x: session.run([OUTPUT_NAME], {"features": x})[0]
        t = np.concatenate(split_thresholds(self.booster, N_FEATURES))
        self.boundaries = np.unique(np.concatenate(
            [t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf))])).tolist()


@pytest.fixture(scope="module", params=sorted(OBJECTIVES))
def model(request) -> Model:
    return Model(request.param)


def _rows(boundaries: list[float]) -> st.SearchStrategy[np.ndarray]:
    cell = st.one_of(st.sampled_from(boundaries), st.sampled_from(SPECIALS), st.floats(width=32))
    return arrays(np.float32, st.tuples(st.integers(1, 64), st.just(N_FEATURES)), elements=cell)


@settings(max_examples=60, derandomize=True, deadline=None, database=None)
@given(data=st.data())
def test_onnx_scores_like_xgboost_on_property_rows(model, data):
    x = data.draw(_rows(model.boundaries))
    report = check_parity(model.booster, model.score, x)
    assert report.passed, report


def test_onnx_scores_like_xgboost_on_the_gate_rows(model):
    holdout = np.random.default_rng(3).normal(size=(200, N_FEATURES)).astype(np.float32)
    report = check_parity(model.booster, model.score, gate_rows(model.booster, holdout, n_property=3000))
    assert report.passed and report.rows == 200 + 4 + N_FEATURES + 3000, report


def _stump(default_left: bool) -> tuple[xgb.Booster, float, float, float]:
    """One split on feature 0; returns the booster, its threshold and the left/right leaf margins."""
    x = np.array([[-2.0], [-1.0], [1.0], [2.0], [np.nan], [np.nan]] * 20, dtype=np.float32)
    y = np.array([0, 0, 1, 1, 0 if default_left else 1, 0 if default_left else 1] * 20, dtype=np.float32)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 1, "base_score": 0.5}, xgb.DMatrix(x, label=y), 1)
    tree = json.loads(bytes(booster.save_raw("json")))["learner"]["gradient_booster"]["model"]["trees"][0]
    assert bool(tree["default_left"][0]) is default_left
    left, right = tree["left_children"][0], tree["right_children"][0]
    return booster, tree["split_conditions"][0], tree["split_conditions"][left], tree["split_conditions"][right]


@pytest.mark.parametrize("default_left", [True, False])
def test_thresholds_and_infinities_go_the_same_way_in_xgboost_and_onnxruntime(default_left):
    booster, threshold, left, right = _stump(default_left)
    t = np.float32(threshold)
    values = [t, np.nextafter(t, np.float32(-np.inf)), np.nextafter(t, np.float32(np.inf)), np.inf, -np.inf, np.nan]
    missing = left if default_left else right
    expected_leaf = [right, left, right, right, left, missing]
    x = np.asarray(values, dtype=np.float32).reshape(-1, 1)
    margin = booster.inplace_predict(x, predict_type="margin")
    np.testing.assert_allclose(margin, np.asarray(expected_leaf), rtol=1e-6)
    session = ort.InferenceSession(to_onnx(booster, 1).SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_p = session.run([OUTPUT_NAME], {"features": x})[0][:, 1]
    np.testing.assert_allclose(onnx_p, 1 / (1 + np.exp(-np.asarray(expected_leaf))), rtol=1e-6)


def test_the_gate_names_the_inputs_an_artifact_gets_wrong():
    """A scorer that treats +inf as missing (as some runtimes do) is caught, and the report shows the row."""
    booster, threshold, _, _ = _stump(default_left=True)
    x = np.asarray([[threshold], [np.inf], [-np.inf], [np.nan], [0.0]], dtype=np.float32)
    inf_as_missing = lambda a: booster.inplace_predict(np.where(np.isposinf(a), np.nan, a))  # noqa: E731
    report = check_parity(booster, inf_as_missing, x)
    assert not report.passed and report.flipped_decisions == 1 and report.worst_row == ("inf",)
    with pytest.raises(ParityError, match=r"worst: row 1 = \[inf\]"):
        require(report, "inf-as-missing artifact")


def test_regression_uses_a_relative_tolerance():
    booster = _train("reg:squarederror")
    x = np.random.default_rng(0).normal(size=(100, N_FEATURES)).astype(np.float32)
    close = check_parity(booster, lambda a: booster.inplace_predict(a) * (1 + 1e-6), x)
    far = check_parity(booster, lambda a: booster.inplace_predict(a) * (1 + 1e-3), x)
    assert close.passed and close.task == "regression" and close.max_abs_diff > 1e-5
    assert not far.passed and far.flipped_decisions == 0


def test_property_rows_are_deterministic_and_probe_the_boundaries():
    booster = _train("binary:logistic")
    rows = property_rows(booster, N_FEATURES, n=2000, seed=7, categorical={4: 3})
    assert rows.dtype == np.float32 and rows.shape == (2000, N_FEATURES)
    assert rows.tobytes() == property_rows(booster, N_FEATURES, n=2000, seed=7, categorical={4: 3}).tobytes()
    assert rows.tobytes() != property_rows(booster, N_FEATURES, n=2000, seed=8, categorical={4: 3}).tobytes()
    col = rows[:, 0]
    t = split_thresholds(booster, N_FEATURES)[0]
    assert np.isnan(col).any() and np.isposinf(col).any() and np.isneginf(col).any()
    assert (np.signbit(col) & (col == 0)).any()  # -0.0
    assert np.isin(t, col).any()
    assert np.isin(np.nextafter(t, np.float32(np.inf)), col).any()
    assert np.isin(np.nextafter(t, np.float32(-np.inf)), col).any()
    codes = rows[:, 4]
    assert set(np.unique(codes[~np.isnan(codes)])) >= {0.0, 1.0, 2.0, -1.0, 3.0, 4.0, 2.0**24}
