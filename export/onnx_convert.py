"""XGBoost booster -> ONNX (onnxmltools), refusing objectives the converter gets wrong."""

from __future__ import annotations

import json

import onnx
import xgboost as xgb

from export.errors import UnsupportedModelError

INPUT_NAME = "features"
PROBABILITIES = "probabilities"

#: Objectives whose ONNX output matches xgboost (verified to <= 5e-7 on probabilities).
SUPPORTED_OBJECTIVES = ("binary:logistic", "multi:softprob", "multi:softmax", "reg:squarederror",
                        "reg:absoluteerror", "reg:pseudohubererror")
REJECTED = {
    "reg:logistic": "the converter scores it wrong (max difference 2.6 seen); train with binary:logistic",
    "binary:logitraw": "the converter refuses raw logits; train with binary:logistic",
}


def objective_of(booster: xgb.Booster) -> str:
    return json.loads(booster.save_config())["learner"]["objective"]["name"]


def to_onnx(booster: xgb.Booster, n_features: int) -> onnx.ModelProto:
    """Convert `booster` to an ONNX graph with one float input `features` [N, n_features]."""
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    objective = objective_of(booster)
    if objective in REJECTED:
        raise UnsupportedModelError(f"objective {objective!r} cannot be exported: {REJECTED[objective]}")
    if objective not in SUPPORTED_OBJECTIVES:
        raise UnsupportedModelError(f"objective {objective!r} is not supported; supported: {list(SUPPORTED_OBJECTIVES)}")
    plain = booster.copy()
    plain.feature_names = None  # the converter needs f0, f1, ...; names live in the feature spec
    plain.feature_types = None
    model = convert_xgboost(plain, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))])
    onnx.checker.check_model(model)
    return model
