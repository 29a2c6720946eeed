"""What treeops reads off an xgboost booster: its task, its served width, and the forms export writes.

One module for the booster helpers every target uses (ONNX, the compiled forest, FIL's JSON).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
import xgboost as xgb

from export.errors import UnsupportedModelError

Task = Literal["binary", "multiclass", "regression"]

#: Objectives whose ONNX output matches xgboost; each is covered by tests/test_parity_properties.py.
TASKS: dict[str, Task] = {
    "binary:logistic": "binary",
    "multi:softprob": "multiclass",
    "multi:softmax": "multiclass",  # served as probabilities: converted as multi:softprob (same trees)
    "reg:squarederror": "regression",
    "reg:absoluteerror": "regression",
    "reg:pseudohubererror": "regression",
}
SUPPORTED_OBJECTIVES = tuple(TASKS)
REJECTED = {
    "reg:logistic": "the converter scores it wrong (max difference 2.6 seen); train with binary:logistic",
    "binary:logitraw": "the converter refuses raw logits; train with binary:logistic",
}


def objective_of(booster: xgb.Booster) -> str:
    return json.loads(booster.save_config())["learner"]["objective"]["name"]


def task_of(booster: xgb.Booster) -> Task:
    """binary, multiclass or regression; unsupported objectives raise UnsupportedModelError with the fix."""
    objective = objective_of(booster)
    if objective in REJECTED:
        raise UnsupportedModelError(f"objective {objective!r} cannot be exported: {REJECTED[objective]}")
    if objective not in TASKS:
        raise UnsupportedModelError(
            f"objective {objective!r} is not supported; train with one of {list(SUPPORTED_OBJECTIVES)}"
        )
    return TASKS[objective]


def n_outputs(booster: xgb.Booster) -> int:
    """Width of the served output: 2 probabilities (binary), num_class (multi-class), 1 value (regression)."""
    task = task_of(booster)
    if task == "binary":
        return 2
    if task == "multiclass":
        return int(json.loads(booster.save_config())["learner"]["learner_model_param"]["num_class"])
    return 1


def probability_booster(booster: xgb.Booster) -> xgb.Booster:
    """A copy whose predictions are what is served: multi:softmax becomes multi:softprob (same trees)."""
    plain = booster.copy()
    if objective_of(booster) == "multi:softmax":
        # multi:softmax predicts class ids and onnxmltools then emits raw margins as "probabilities".
        plain.set_param({"objective": "multi:softprob"})
    return plain


def legacy_xgboost_json(booster: xgb.Booster) -> dict[str, Any]:
    """The booster as XGBoost JSON that Treelite 4.3 (Triton 24.10's FIL) and xgboost 3.x both read."""
    model = json.loads(bytes(booster.save_raw("json")))
    learner = model["learner"]
    if learner["gradient_booster"].get("name") != "gbtree":
        raise UnsupportedModelError(
            f"the fil target exports gbtree boosters only, not {learner['gradient_booster'].get('name')!r}; "
            "train with booster='gbtree' or use the onnxruntime target"
        )
    forest = learner["gradient_booster"]["model"]
    cats = forest.pop("cats", None)
    if cats and any(cats.get(k) for k in ("enc", "feature_segments", "sorted_idx")):
        raise UnsupportedModelError(
            "the model has categorical splits, which Triton 24.10's FIL cannot read; encode categories as "
            "float codes (as the feature spec does) or use the onnxruntime target"
        )
    if objective_of(booster) == "multi:softmax":
        learner["objective"]["name"] = "multi:softprob"  # serve probabilities, as the ONNX targets do
    param = learner["learner_model_param"]
    intercepts = [float(v) for v in str(param["base_score"]).strip("[]").split(",")]
    if len(intercepts) == 1:
        param["base_score"] = repr(float(np.float32(intercepts[0])))
    else:
        _fold_intercepts(forest, intercepts)
        param["base_score"] = "0"
    return model


def _fold_intercepts(forest: dict[str, Any], intercepts: list[float]) -> None:
    """Add class k's intercept (a margin) to every leaf of class k's first tree."""
    done: set[int] = set()
    for tree, group in zip(forest["trees"], forest["tree_info"]):
        if group in done:
            continue
        done.add(group)
        offset = np.float32(intercepts[group])
        for i, left in enumerate(tree["left_children"]):
            if left == -1:  # a leaf: its value is stored in split_conditions (and base_weights)
                tree["split_conditions"][i] = float(np.float32(tree["split_conditions"][i]) + offset)
                tree["base_weights"][i] = float(np.float32(tree["base_weights"][i]) + offset)
    missing = set(range(len(intercepts))) - done
    if missing:
        raise UnsupportedModelError(f"classes {sorted(missing)} have no trees; retrain with more boosting rounds")
