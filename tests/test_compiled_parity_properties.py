"""Property tests: the compiled forest (forest.so's predict_rows, what the native backend calls) scores like xgboost.

The same cases as test_parity_properties.py for ONNX: NaN, +/-inf, +/-0, subnormals, float32
extremes, split thresholds and their +/- one ulp neighbours, for binary, multiclass and regression.
The reference is xgboost's Booster (`inplace_predict`, which takes +/-inf; a DMatrix refuses it).
A forest compiled with flush-to-zero or with thresholds printed short of round-trip precision
fails here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from export.compiled_forest import compile_forest, compiled_scorer
from export.parity import check_parity, split_thresholds

pytest.importorskip("tl2cgen", reason="the compiled forest needs tl2cgen (pinned in the test extras)")
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler (gcc)")

N_FEATURES = 5
SUBNORMAL_SCALE = 1e-40  # feature 2 lives in float32's subnormal range, so some thresholds are subnormal
OBJECTIVES = {
    "binary:logistic": {},
    "multi:softprob": {"num_class": 3},
    "multi:softmax": {"num_class": 3},
    "reg:squarederror": {},
}
_F32 = np.finfo(np.float32)
SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, float(_F32.max), -float(_F32.max), float(_F32.smallest_subnormal),
            -float(_F32.smallest_subnormal), float(_F32.tiny), 2.0**24]


def _train(objective: str) -> xgb.Booster:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1500, N_FEATURES)).astype(np.float32)
    x[:, 2] *= np.float32(SUBNORMAL_SCALE)
    x[:, 3] = rng.integers(-2, 3, size=len(x))  # integer steps: a split at 0 sees -0.0 and +0.0
    x[rng.random(x.shape) < 0.2] = np.nan  # so that default directions go both ways
    a, b = np.nan_to_num(x[:, 0], nan=-1.0), np.nan_to_num(x[:, 2] / SUBNORMAL_SCALE, nan=1.0)
    c = np.nan_to_num(x[:, 3], nan=0.0)
    if objective.startswith("multi"):
        y = (a > 0).astype(int) + (b + c > 0.5)
    elif objective.startswith("reg"):
        y = 50 * a + 10 * b + 5 * c + rng.normal(size=len(a))
    else:
        y = (a + 0.5 * b + 0.3 * c + rng.normal(scale=0.3, size=len(a)) > 0).astype(int)
    params = {"objective": objective, "max_depth": 4, "seed": 0, **OBJECTIVES[objective]}
    return xgb.train(params, xgb.DMatrix(x, label=y), 25)


class Compiled:
    """A booster, its compiled forest's scorer and the boundary values (thresholds and ulp neighbours)."""

    def __init__(self, booster: xgb.Booster, folder: Path) -> None:
        self.booster = booster
        self.score = compiled_scorer(compile_forest(booster, booster.num_features(), folder / "forest.so"))
        t = np.concatenate(split_thresholds(booster, booster.num_features()))
        self.boundaries = np.unique(np.concatenate(
            [t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf))])).tolist()


@pytest.fixture(scope="module", params=sorted(OBJECTIVES))
def model(request, tmp_path_factory) -> Compiled:
    return Compiled(_train(request.param), tmp_path_factory.mktemp("forest"))


def test_the_training_data_gives_subnormal_and_zero_thresholds(model):
    thresholds = split_thresholds(model.booster, N_FEATURES)
    subnormal = thresholds[2][(thresholds[2] != 0) & (np.abs(thresholds[2]) < _F32.tiny)]
    assert subnormal.size > 0, thresholds[2]  # the subnormal cases below probe real split points
    assert thresholds[3].size > 0


def _rows(boundaries: list[float]) -> st.SearchStrategy[np.ndarray]:
    cell = st.one_of(st.sampled_from(boundaries), st.sampled_from(SPECIALS), st.floats(width=32),
                     st.floats(width=32, min_value=-float(_F32.tiny), max_value=float(_F32.tiny)))
    return arrays(np.float32, st.tuples(st.integers(1, 64), st.just(N_FEATURES)), elements=cell)


@settings(max_examples=80, derandomize=True, deadline=None, database=None)
@given(data=st.data())
def test_compiled_forest_scores_like_xgboost_on_property_rows(model, data):
    x = data.draw(_rows(model.boundaries))
    report = check_parity(model.booster, model.score, x)  # the export gate's limit
    assert report.passed, report


def test_a_row_scores_the_same_alone_and_in_a_batch(model):
    x = np.random.default_rng(1).choice(np.asarray(model.boundaries + SPECIALS, np.float32), size=(300, N_FEATURES))
    batch = model.score(x)
    alone = np.vstack([model.score(x[i : i + 1]) for i in range(len(x))])
    assert batch.tobytes() == alone.tobytes()


def _stump(values: list[float], default_left: bool) -> tuple[xgb.Booster, float, float, float]:
    """One split on feature 0 between the first two and last two `values`; returns the booster, its
    threshold and the left/right leaf margins."""
    x = np.array([[v] for v in values] + [[np.nan], [np.nan]], dtype=np.float32).repeat(20, axis=0)
    y = np.array([0, 0, 1, 1] + [0 if default_left else 1] * 2, dtype=np.float32).repeat(20)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 1, "base_score": 0.5}, xgb.DMatrix(x, label=y), 1)
    tree = json.loads(bytes(booster.save_raw("json")))["learner"]["gradient_booster"]["model"]["trees"][0]
    assert bool(tree["default_left"][0]) is default_left
    left, right = tree["left_children"][0], tree["right_children"][0]
    return booster, tree["split_conditions"][0], tree["split_conditions"][left], tree["split_conditions"][right]


@pytest.mark.parametrize("scale", [1.0, SUBNORMAL_SCALE], ids=["normal", "subnormal"])
@pytest.mark.parametrize("default_left", [True, False])
def test_thresholds_ulps_infinities_and_zeros_take_xgboosts_branch(scale, default_left, tmp_path):
    """x < threshold goes left; +inf goes right and -inf left even against the default; only NaN takes it."""
    booster, threshold, left, right = _stump([-2 * scale, -1 * scale, 1 * scale, 2 * scale], default_left)
    t = np.float32(threshold)
    assert scale == 1.0 or 0 < abs(t) < _F32.tiny, t  # the subnormal case splits at a subnormal value
    down, up = np.nextafter(t, np.float32(-np.inf)), np.nextafter(t, np.float32(np.inf))
    values = [t, down, up, np.inf, -np.inf, np.nan, 0.0, -0.0]
    x = np.asarray(values, dtype=np.float32).reshape(-1, 1)
    margin = booster.inplace_predict(x, predict_type="margin")
    leaf = [left if (not np.isnan(v) and v < t) else right for v in values[:5]]
    leaf += [left if default_left else right] + [left if v < t else right for v in values[6:]]
    np.testing.assert_array_equal(margin, np.asarray(leaf, dtype=np.float32))  # xgboost's branches, pinned
    score = compiled_scorer(compile_forest(booster, 1, tmp_path / "forest.so"))
    np.testing.assert_allclose(score(x)[:, 1], booster.inplace_predict(x), rtol=0, atol=1e-7)
