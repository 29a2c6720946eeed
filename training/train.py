"""XGBoost training on the feature spec with a time-ordered split and early stopping."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import xgboost as xgb
from sklearn import metrics as skm

from training.errors import DataError
from training.features import FeatureSpec, FittedFeatures

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters; `valid_fraction` and `test_fraction` are the newest rows by time."""

    max_depth: int = 6
    learning_rate: float = 0.1
    num_boost_round: int = 200
    early_stopping_rounds: int = 20
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 1.0
    valid_fraction: float = 0.15
    test_fraction: float = 0.15
    threshold: float = 0.5
    seed: int = 7
    nthread: int = 0

    def booster_params(self) -> dict[str, Any]:
        return {
            "objective": "binary:logistic",
            "eval_metric": ["logloss", "aucpr"],
            "tree_method": "hist",
            "max_depth": self.max_depth,
            "eta": self.learning_rate,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "min_child_weight": self.min_child_weight,
            "seed": self.seed,
            "nthread": self.nthread,
        }


@dataclass
class TrainResult:
    """What training produced: the trimmed booster, its features, test metrics and holdout rows."""

    booster: xgb.Booster
    target: str
    features: FittedFeatures
    metrics: dict[str, float]
    holdout: pl.DataFrame  # computed (not yet encoded) features of the test rows + target
    test_predictions: np.ndarray  # positive-class probability of each holdout row
    rows: dict[str, int] = field(default_factory=dict)


def train_classifier(raw: pl.LazyFrame, spec: FeatureSpec, target: str, params: TrainParams) -> TrainResult:
    """Fit a binary classifier on `raw` (must hold `target` in {0, 1}); the newest rows are held out."""
    order = list(spec.order_by) or [spec.names[0]]
    frame = raw.sort(order).collect()
    _check_target(frame, target)
    n = frame.height
    n_test = int(n * params.test_fraction)
    n_valid = int(n * params.valid_fraction)
    n_train = n - n_test - n_valid
    if min(n_train, n_valid, n_test) < 10:
        raise DataError(f"{n} rows is too few to split into train/valid/test; provide at least 100 rows")
    computed = spec.compute(frame.lazy()).collect()
    # Vocabularies come from the training slice only, so valid/test see unknowns as production would.
    fitted = spec.fit(computed.head(n_train))
    x = fitted.matrix(computed)
    y = frame[target].cast(pl.Float32).to_numpy()
    if np.isnan(x).all(axis=0).any():
        empty = [spec.names[i] for i in np.where(np.isnan(x).all(axis=0))[0]]
        raise DataError(f"feature(s) {empty} are missing in every row; check the raw columns they are computed from")
    sl_train, sl_valid, sl_test = slice(0, n_train), slice(n_train, n_train + n_valid), slice(n_train + n_valid, n)
    dtrain = xgb.DMatrix(x[sl_train], label=y[sl_train], feature_names=spec.names)
    dvalid = xgb.DMatrix(x[sl_valid], label=y[sl_valid], feature_names=spec.names)
    booster = xgb.train(
        params.booster_params(),
        dtrain,
        num_boost_round=params.num_boost_round,
        evals=[(dvalid, "valid")],
        early_stopping_rounds=params.early_stopping_rounds,
        verbose_eval=False,
    )
    best = booster.best_iteration
    # Keep exactly the trees that are served, so every later consumer scores the same model.
    booster = booster[: best + 1]
    p_test = booster.predict(xgb.DMatrix(x[sl_test], feature_names=spec.names))
    result_metrics = classification_metrics(y[sl_test], p_test, params.threshold)
    result_metrics["best_iteration"] = float(best)
    holdout = computed.slice(n_train + n_valid).with_columns(pl.Series(target, y[sl_test]))
    log.info("trained %d trees; test ROC AUC %.4f", best + 1, result_metrics["roc_auc"])
    return TrainResult(booster, target, fitted, result_metrics, holdout, p_test, {"train": n_train, "valid": n_valid, "test": n_test})


def classification_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """ROC AUC, PR AUC, log loss, Brier score, precision and recall at `threshold`."""
    pred = p >= threshold
    return {
        "roc_auc": float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan"),
        "pr_auc": float(skm.average_precision_score(y, p)) if len(np.unique(y)) == 2 else float("nan"),
        "log_loss": float(skm.log_loss(y, p, labels=[0, 1])),
        "brier": float(skm.brier_score_loss(y, p)),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, zero_division=0)),
    }


def _check_target(frame: pl.DataFrame, target: str) -> None:
    if target not in frame.columns:
        raise DataError(f"target column {target!r} is not in the data; columns: {frame.columns}")
    col = frame[target]
    if col.null_count():
        raise DataError(f"target column {target!r} has {col.null_count()} missing values")
    values = set(col.unique().to_list())
    if not values <= {0, 1, True, False}:
        raise DataError(f"target column {target!r} must hold 0/1 for binary classification; found {sorted(values)[:10]}")
    if len(values) < 2:
        raise DataError(f"target column {target!r} has only one class ({values.pop()}); a classifier needs both")
