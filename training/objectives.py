"""Learning objectives: how labels are encoded, which XGBoost objective trains them, how they are scored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
from sklearn import metrics as skm

from training.errors import DataError, SettingsError

Kind = Literal["binary", "multiclass", "regression"]
KINDS: tuple[str, ...] = ("auto", "binary", "multiclass", "regression")
MAX_CLASSES = 100
#: Metrics where a smaller value is better; all others are better when larger.
LOWER_IS_BETTER = frozenset({"log_loss", "brier", "rmse", "mae"})


@dataclass(frozen=True)
class Objective:
    """One objective; `classes` is the sorted label vocabulary of classifiers (as strings)."""

    kind: Kind
    classes: tuple[str, ...] = ()
    threshold: float = 0.5

    @property
    def primary_metric(self) -> str:
        return {"binary": "roc_auc", "multiclass": "log_loss", "regression": "rmse"}[self.kind]

    @property
    def n_outputs(self) -> int:
        return {"binary": 2, "multiclass": len(self.classes), "regression": 1}[self.kind]

    def xgb_params(self) -> dict[str, Any]:
        if self.kind == "binary":
            return {"objective": "binary:logistic", "eval_metric": ["aucpr", "logloss"]}
        if self.kind == "multiclass":
            return {"objective": "multi:softprob", "num_class": len(self.classes), "eval_metric": ["mlogloss"]}
        return {"objective": "reg:squarederror", "eval_metric": ["rmse"]}

    def encode_labels(self, labels: pl.Series) -> np.ndarray:
        """Labels as float32 (class index for classifiers); unknown labels raise DataError."""
        if self.kind == "regression":
            return labels.cast(pl.Float32).to_numpy()
        labels = _plain(labels)
        codes = labels.cast(pl.String).replace_strict(list(self.classes), list(range(len(self.classes))),
                                                      default=None, return_dtype=pl.Float32)
        if codes.null_count():
            unknown = labels.filter(codes.is_null()).unique().head(5).to_list()
            raise DataError(f"target {labels.name!r} has labels {unknown} outside the classes {list(self.classes)}")
        return codes.to_numpy()

    def metrics(self, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        """Test metrics; `pred` is P(positive) for binary, class probabilities for multiclass, values otherwise."""
        if self.kind == "binary":
            return binary_metrics(y, pred.reshape(len(y), -1)[:, -1], self.threshold)
        if self.kind == "multiclass":
            probs = pred.reshape(len(y), -1)
            labels = list(range(len(self.classes)))
            out = {
                "log_loss": float(skm.log_loss(y, probs, labels=labels)),
                "accuracy": float(skm.accuracy_score(y, probs.argmax(axis=1))),
                "macro_f1": float(skm.f1_score(y, probs.argmax(axis=1), average="macro", labels=labels, zero_division=0)),
            }
            if len(np.unique(y)) == len(labels):
                out["roc_auc"] = float(skm.roc_auc_score(y, probs, multi_class="ovr", labels=labels))
            return out
        err = pred.reshape(-1) - y
        return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))),
                "r2": float(skm.r2_score(y, pred.reshape(-1)))}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": list(self.classes), "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Objective:
        return cls(data["kind"], tuple(data.get("classes", ())), float(data.get("threshold", 0.5)))


def infer_objective(labels: pl.Series, requested: str = "auto", threshold: float = 0.5) -> Objective:
    """Pick the objective from the target column (or check the requested one fits it)."""
    if requested not in KINDS:
        raise SettingsError(f"unknown objective {requested!r}; choose one of {list(KINDS)}")
    labels = _plain(labels)
    name = labels.name
    if labels.null_count():
        raise DataError(f"target column {name!r} has {labels.null_count()} missing values")
    distinct = labels.drop_nulls().unique()
    numeric = labels.dtype.is_numeric()
    kind = requested
    if kind == "auto":
        if len(distinct) == 2:
            kind = "binary"
        elif not numeric or (labels.dtype.is_integer() and len(distinct) <= 20):
            kind = "multiclass"
        else:
            kind = "regression"
    if kind == "regression":
        if not numeric:
            raise DataError(f"target column {name!r} is {labels.dtype}; regression needs numbers")
        if len(distinct) < 2:
            raise DataError(f"target column {name!r} is constant ({distinct[0]}); nothing to learn")
        return Objective("regression")
    classes = tuple(sorted(str(v) for v in distinct.to_list()))
    if numeric:
        classes = tuple(str(v) for v in sorted(distinct.to_list()))
    if len(classes) < 2:
        raise DataError(f"target column {name!r} has only one class ({classes[0]}); a classifier needs two or more")
    if kind == "binary" and len(classes) != 2:
        raise DataError(f"target column {name!r} has {len(classes)} classes; binary needs exactly 2 (try multiclass)")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"target column {name!r} has {len(classes)} distinct values, more than {MAX_CLASSES} classes; "
                        "did you mean --objective regression?")
    return Objective(kind, classes, threshold)  # type: ignore[arg-type]


def check_target_values(raw: pl.LazyFrame, target: str, where: str, shown: int = 10) -> None:
    """Refuse a target column with missing, NaN or infinite values, naming the column and the first rows (1-based,
    in file order) that hold them; xgboost would only say "Label contains NaN, infinity or a value too large"."""
    col = pl.col(target)
    bad = col.is_null()
    if raw.collect_schema()[target].is_float():
        bad = bad | ~col.is_finite()
    rows = raw.select(col).with_row_index("_row").filter(bad).select("_row").collect()["_row"]
    if rows.len():
        first = ", ".join(str(r + 1) for r in rows.head(shown).to_list())
        more = f" and {rows.len() - shown} more" if rows.len() > shown else ""
        raise DataError(f"target column {target!r} of {where} has {rows.len()} missing, NaN or infinite value(s) "
                        f"(rows {first}{more}); fill or drop those rows")


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """ROC AUC, PR AUC, log loss, Brier score, precision and recall at `threshold`."""
    pred = p >= threshold
    both = len(np.unique(y)) == 2
    return {
        "roc_auc": float(skm.roc_auc_score(y, p)) if both else float("nan"),
        "pr_auc": float(skm.average_precision_score(y, p)) if both else float("nan"),
        "log_loss": float(skm.log_loss(y, p, labels=[0, 1])),
        "brier": float(skm.brier_score_loss(y, p)),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, zero_division=0)),
    }


def _plain(labels: pl.Series) -> pl.Series:
    """Booleans as 0/1 so their class names read the same however they are stored."""
    return labels.cast(pl.Int8) if labels.dtype == pl.Boolean else labels
