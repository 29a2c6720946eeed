"""XGBoost training on a feature spec: ordered train/valid/test split, early stopping, test metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import xgboost as xgb

from training.errors import DataError
from training.features import FeatureSpec, FittedFeatures
from training.objectives import Objective, check_target_values, infer_objective

log = logging.getLogger(__name__)

RAW_HOLDOUT_ROWS = 20_000


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters. `valid_fraction` and `test_fraction` are the newest rows by the spec's
    order (file order when the spec has none); `objective` is auto, binary, multiclass or regression."""

    objective: str = "auto"
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

    def booster_params(self, objective: Objective) -> dict[str, Any]:
        return {
            **objective.xgb_params(),
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
    objective: Objective
    features: FittedFeatures
    metrics: dict[str, float]
    holdout: pl.DataFrame  # computed (not yet encoded) features of the test rows + target
    raw_holdout: pl.DataFrame  # the first test rows as raw columns, for raw-input export parity
    test_predictions: np.ndarray  # P(positive) for binary, class probabilities, or predicted values
    rows: dict[str, int] = field(default_factory=dict)


def train_model(raw: pl.LazyFrame, spec: FeatureSpec, target: str, params: TrainParams,
                source: str = "the data") -> TrainResult:
    """Fit `spec`'s features to `target`; the newest rows are held out for validation and test.

    `source` (the file) names where bad target values are."""
    if target not in raw.collect_schema():
        raise DataError(f"target column {target!r} is not in the data; columns: {list(raw.collect_schema())}")
    check_target_values(raw, target, source)  # before sorting, so the rows it names are the file's
    ordered = raw.sort(list(spec.order_by)) if spec.order_by else raw
    # One pass from raw rows to features + label: the raw table is never held in memory as well.
    computed = spec.compute(ordered, keep=(target,)).collect()
    objective = infer_objective(computed[target], params.objective, params.threshold)
    n = computed.height
    n_test = int(n * params.test_fraction)
    n_valid = int(n * params.valid_fraction)
    n_train = n - n_test - n_valid
    if min(n_train, n_valid, n_test) < 10:
        raise DataError(f"{n} rows is too few to split into train/valid/test; provide at least 100 rows")
    # Vocabularies come from the training slice only, so valid/test see unknowns as production would.
    fitted = spec.fit(computed.head(n_train))
    y = objective.encode_labels(computed[target])
    holdout = computed.slice(n_train + n_valid)
    raw_holdout = ordered.select(*spec.raw_schema).slice(n_train + n_valid, RAW_HOLDOUT_ROWS).collect()
    x = fitted.matrix(computed)
    del computed
    empty = [spec.names[i] for i in np.where(np.isnan(x[:n_train]).all(axis=0))[0]]
    if empty:
        raise DataError(f"feature(s) {empty} are missing in every training row; check the columns they come from")
    names = [xgb_safe(n) for n in spec.names]
    sl_train, sl_valid, sl_test = slice(0, n_train), slice(n_train, n_train + n_valid), slice(n_train + n_valid, n)
    booster = fit_booster(x, y, names, params, objective, sl_train, sl_valid)
    best = booster.num_boosted_rounds() - 1
    pred = booster.predict(xgb.DMatrix(x[sl_test], feature_names=names))
    metrics = objective.metrics(y[sl_test], pred)
    metrics["best_iteration"] = float(best)
    stateless = [i for i, f in enumerate(spec.features) if not f.stateful]
    if 0 < len(stateless) < len(spec.features):
        # What the history features are worth: the same split and parameters without them.
        xs = np.ascontiguousarray(x[:, stateless])
        plain = fit_booster(xs, y, [names[i] for i in stateless], params, objective, sl_train, sl_valid)
        plain_pred = plain.predict(xgb.DMatrix(xs[sl_test], feature_names=[names[i] for i in stateless]))
        primary = objective.primary_metric
        metrics[f"{primary}_without_history"] = objective.metrics(y[sl_test], plain_pred)[primary]
    log.info("trained %s model with %d trees; test %s %.4f", objective.kind, best + 1, objective.primary_metric,
             metrics[objective.primary_metric])
    return TrainResult(booster, target, objective, fitted, metrics, holdout, raw_holdout, pred,
                       {"train": n_train, "valid": n_valid, "test": n_test})


def fit_booster(x: np.ndarray, y: np.ndarray, names: list[str], params: TrainParams, objective: Objective,
         sl_train: slice, sl_valid: slice) -> xgb.Booster:
    """Train with early stopping on the validation slice; keep exactly the trees that are served."""
    # QuantileDMatrix stores the binned matrix (about a quarter of the float copy) for `hist`.
    dtrain = xgb.QuantileDMatrix(x[sl_train], label=y[sl_train], feature_names=names)
    dvalid = xgb.QuantileDMatrix(x[sl_valid], label=y[sl_valid], feature_names=names, ref=dtrain)
    booster = xgb.train(
        params.booster_params(objective), dtrain, num_boost_round=params.num_boost_round,
        evals=[(dvalid, "valid")], early_stopping_rounds=params.early_stopping_rounds, verbose_eval=False,
    )
    return booster[: booster.best_iteration + 1]


def xgb_safe(name: str) -> str:
    """XGBoost refuses '[', ']' and '<' in feature names; the spec keeps the real names."""
    return name.replace("[", "(").replace("]", ")").replace("<", "lt ")
