"""A retrain's training set from served traffic: the prediction log's answered rows joined with their labels.

The features are the logged `feature.*` columns: the values the served version computed when each request arrived
(point-in-time correct: a history feature is what the online store held then, never recomputed with hindsight).
The rows keep their arrival order, so the newest ones are the holdout, as training's time split has it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from monitoring.labels import ID, LABEL, join_labels
from monitoring.reference import RAW_PREFIX, feature_column
from retraining.errors import InsufficientLabelsError, RetrainError
from training.features import FittedFeatures


@dataclass(frozen=True)
class LoggedTrainingSet:
    """Labelled served rows in arrival order: the encoded matrix as served, the same rows decoded and their raw
    fields (where the served model logs them; no rows otherwise), and what was counted on the way."""

    matrix: np.ndarray  # float32 rows x features, the served `features` tensor
    labels: np.ndarray  # float32 0/1
    computed: pl.DataFrame  # the matrix decoded to computed features (categories as text) + target, as training keeps
    raw: pl.DataFrame  # the raw fields of the same rows (raw-transaction models), or an empty frame of the raw schema
    counts: dict[str, int]  # logged, answered, degraded, repeated, labelled, positives


def logged_training_set(rows: pl.DataFrame, labels: pl.DataFrame, fitted: FittedFeatures, target: str, *,
                        min_labels: int, min_per_class: int, where: str) -> LoggedTrainingSet:
    """Answered, non-degraded first answers per transaction with a label, as a training set for `fitted`'s spec.

    `rows`: a prediction-log window of versions that served with `fitted` (same spec and vocabularies), every
    feature column present (a raw model's stateless ones completed by `monitoring.monitor.with_stateless_features`).

    Raises:
        RetrainError: a feature column of the spec is not in the rows (`where` names the log).
        InsufficientLabelsError: fewer than `min_labels` labelled rows, or fewer than `min_per_class` of a class.
    """
    columns = [feature_column(name) for name in fitted.spec.names]
    missing = [c for c in columns if c not in rows.columns]
    if rows.height and missing:
        raise RetrainError(f"the prediction log {where} lacks feature column(s) {missing} of spec {fitted.spec.name!r}; "
                           "retrain from rows the champion's spec served, or pass --data FILE")
    answered = rows.filter(pl.col("error").is_null() & pl.col("score").is_not_null())
    degraded = answered.filter(pl.col("degraded").fill_null(False))
    served = answered.filter(~pl.col("degraded").fill_null(False) & pl.col(ID).is_not_null())
    first = served.unique(ID, keep="first", maintain_order=True)  # a retry's later answer is not a second example
    joined = join_labels(first, labels).filter(pl.col(LABEL).is_not_null())
    y = joined[LABEL].cast(pl.Float32).to_numpy()
    counts = {"logged": rows.height, "answered": answered.height, "degraded": degraded.height,
              "repeated": served.height - first.height, "labelled": joined.height, "positives": int(y.sum())}
    _check_labels(counts, min_labels, min_per_class, where)
    matrix = np.ascontiguousarray(joined.select(pl.col(c).fill_null(float("nan")) for c in columns).to_numpy(),
                                  dtype=np.float32)
    computed = joined.select(*_decoded(fitted), pl.col(LABEL).alias(target))
    return LoggedTrainingSet(matrix, y, computed, _raw_fields(joined, fitted), counts)


def _check_labels(counts: dict[str, int], min_labels: int, min_per_class: int, where: str) -> None:
    labelled, positives = counts["labelled"], counts["positives"]
    seen = (f"{counts['logged']:,} logged rows, {counts['answered']:,} answered, {counts['degraded']:,} degraded "
            f"left out, {labelled:,} with a label")
    if labelled < min_labels:
        raise InsufficientLabelsError(f"{labelled:,} labelled predictions in {where}, fewer than the {min_labels:,} a "
                                      f"retrain needs ({seen}); widen --window, ingest labels with `treeops labels`, "
                                      "or pass --data FILE. Nothing was registered")
    rarest = min(positives, labelled - positives)
    if rarest < min_per_class:
        which = "positive (1)" if positives < labelled - positives else "negative (0)"
        raise InsufficientLabelsError(
            f"the labelled predictions in {where} hold {rarest:,} {which} label(s) of {labelled:,} ({seen}); a "
            f"classifier needs at least {min_per_class:,} of each class: widen --window or wait for more labels. "
            "Nothing was registered")


def _decoded(fitted: FittedFeatures) -> list[pl.Expr]:
    """The logged float columns back to computed features: category codes to their vocabulary's text (NaN: null),
    so that `fitted.matrix` of the result is the logged matrix again."""
    out = []
    for feature in fitted.spec.features:
        column = pl.col(feature_column(feature.name)).fill_nan(None)
        if feature.categorical:
            vocab = list(fitted.vocabularies[feature.name])
            column = column.cast(pl.Int64).replace_strict(list(range(len(vocab))), vocab, default=None,
                                                          return_dtype=pl.String)
        out.append(column.alias(feature.name))
    return out


def _raw_fields(rows: pl.DataFrame, fitted: FittedFeatures) -> pl.DataFrame:
    """The spec's raw fields of `rows` (logged as `raw.*` by raw-transaction models), or no rows when not logged."""
    schema = fitted.spec.raw_schema
    if not all(RAW_PREFIX + name in rows.columns for name in schema):
        return pl.DataFrame(schema=dict(schema))
    return rows.select(pl.col(RAW_PREFIX + name).cast(pl.Int64 if dtype.is_temporal() else dtype).cast(dtype).alias(name)
                       for name, dtype in schema.items())
