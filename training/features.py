"""The one feature definition: raw transaction columns -> model features.

Training, export (parity rows) and the scoring client all compute features through a
`FeatureSpec`; a `FittedFeatures` adds the category vocabularies learned at training
time and is stored as JSON with every model version.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from backends.online_history import LATE_ARRIVAL_KEY, UNDECLARED_LATE_US, late_us_of
from training.errors import DataError
from training.history import History

#: Unseen or missing categories encode to NaN, which XGBoost and the ONNX graph treat as missing.
UNKNOWN_CATEGORY_CODE = float("nan")
#: A spec's late allowance unless it declares one: 1 day, also what fitted JSON without the field was served with.
DEFAULT_LATE_ARRIVAL = dt.timedelta(microseconds=UNDECLARED_LATE_US)
_US = dt.timedelta(microseconds=1)


@dataclass(frozen=True)
class Feature:
    """One model input: `expr` is evaluated on raw columns; categorical exprs yield strings.
    A feature with a `history` declaration is an aggregate of the entity's earlier transactions
    (see training.history); build it with `history_feature`."""

    name: str
    expr: pl.Expr
    description: str
    categorical: bool = False
    history: History | None = None

    @property
    def stateful(self) -> bool:
        """Depends on earlier transactions, so a single request cannot compute it from its own rows."""
        return self.history is not None


def history_feature(name: str, history: History, description: str) -> Feature:
    """A feature whose offline expression (and online update rule) come from one declaration."""
    return Feature(name, history.expr(), description, history=history)


@dataclass(frozen=True)
class FeatureSpec:
    """Raw schema plus the ordered features computed from it.

    `order_by` (last column unique) orders rows for the train/valid/test split; history features
    do not depend on row order (ties never see each other, see training.history).

    `late_arrival` (>= 0): how far behind its entity's newest transaction a transaction may arrive online and
    still get its exact history; the online store keeps each entity's longest window plus this, so one
    arriving later sees only that kept part (training.history's allowance clause). One value per spec: the
    store prunes an entity's transactions together, whatever feature reads them. Offline features (arrival =
    timestamp order) never depend on it, so it is not in `fingerprint` (changing it means re-exporting, not
    retraining); it is stored with the fitted features and is part of `FittedFeatures.spec_hash`.
    """

    name: str
    raw_schema: Mapping[str, pl.DataType]
    features: tuple[Feature, ...]
    order_by: tuple[str, ...] = ()
    late_arrival: dt.timedelta = DEFAULT_LATE_ARRIVAL

    def __post_init__(self) -> None:
        if not isinstance(self.late_arrival, dt.timedelta) or self.late_arrival < dt.timedelta(0):
            raise DataError(f"feature spec {self.name!r}: late_arrival is {self.late_arrival!r} ({self.late_arrival}); "
                            "give a datetime.timedelta >= 0, e.g. timedelta(hours=1)")

    @property
    def late_arrival_us(self) -> int:
        """The late allowance in microseconds (what the online store and `as_arrived` take)."""
        return self.late_arrival // _US

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def categorical(self) -> list[str]:
        return [f.name for f in self.features if f.categorical]

    def compute(self, raw: pl.LazyFrame, keep: Sequence[str] = ()) -> pl.LazyFrame:
        """Feature columns (categoricals still as strings) plus the `keep` columns, in input row order."""
        return raw.select(*(f.expr.alias(f.name) for f in self.features), *keep)

    def fit(self, computed: pl.LazyFrame | pl.DataFrame) -> FittedFeatures:
        """Learn the sorted vocabulary of every categorical feature from computed features."""
        cats = self.categorical
        vocab: dict[str, tuple[str, ...]] = {}
        if cats:
            uniques = computed.lazy().select(pl.col(c).drop_nulls().unique().implode() for c in cats).collect()
            vocab = {c: tuple(sorted(uniques[c][0].to_list())) for c in cats}
        return FittedFeatures(self, vocab)

    def fingerprint(self) -> str:
        """Hash of the feature definitions (names, expressions, history declarations, order)."""
        text = json.dumps(
            {"features": [[f.name, str(f.expr), f.categorical] + ([f.history.to_dict()] if f.history else [])
                          for f in self.features], "order_by": self.order_by},
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FittedFeatures:
    """A `FeatureSpec` with its category vocabularies: turns raw rows into the float32 matrix."""

    spec: FeatureSpec
    vocabularies: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def encode(self, computed: pl.LazyFrame) -> pl.LazyFrame:
        """Computed features as Float32 in spec order; unknown categories become NaN."""
        cols = []
        for f in self.spec.features:
            if f.categorical:
                vocab = list(self.vocabularies[f.name])
                col = pl.col(f.name).replace_strict(vocab, list(range(len(vocab))), default=None, return_dtype=pl.Float32)
            else:
                col = pl.col(f.name).cast(pl.Float32)
            cols.append(col.fill_nan(None).fill_null(float("nan")).alias(f.name))
        return computed.select(cols)

    def matrix(self, computed: pl.LazyFrame | pl.DataFrame) -> np.ndarray:
        """Encoded computed features as a C-contiguous float32 array (rows x features)."""
        frame = self.encode(computed.lazy()).collect()
        return np.ascontiguousarray(frame.to_numpy(), dtype=np.float32)

    def matrix_raw(self, raw: pl.LazyFrame | pl.DataFrame) -> np.ndarray:
        """Raw rows -> features -> float32 matrix: what a client sends to the served model."""
        return self.matrix(self.spec.compute(raw.lazy()))

    def spec_hash(self) -> str:
        """Hash of the definitions, vocabularies and late allowance: identical hashes score identically."""
        text = json.dumps({"spec": self.spec.fingerprint(), "vocab": {k: list(v) for k, v in self.vocabularies.items()},
                           LATE_ARRIVAL_KEY: self.spec.late_arrival_us})
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description stored with every model version."""
        return {
            "spec": self.spec.name,
            "spec_fingerprint": self.spec.fingerprint(),
            "spec_hash": self.spec_hash(),
            "features": [
                {"name": f.name, "dtype": "float32", "categorical": f.categorical, "description": f.description,
                 "history": f.history.to_dict() if f.history else None}
                for f in self.spec.features
            ],
            "vocabularies": {k: list(v) for k, v in self.vocabularies.items()},
            LATE_ARRIVAL_KEY: self.spec.late_arrival_us,
            "unknown_category": "NaN (treated as missing by the trees)",
            "raw_schema": {k: str(v) for k, v in self.spec.raw_schema.items()},
        }

    @classmethod
    def from_dict(cls, spec: FeatureSpec, data: Mapping[str, Any]) -> FittedFeatures:
        """Rebuild from `to_dict` output; refuses JSON written by different feature code. The stored late
        allowance replaces `spec`'s (JSON without one: DEFAULT_LATE_ARRIVAL, what such versions served with)."""
        if data.get("spec_fingerprint") != spec.fingerprint():
            raise DataError(
                f"feature spec {data.get('spec')!r} stored with the model has fingerprint "
                f"{data.get('spec_fingerprint')}, but the code's spec {spec.name!r} has {spec.fingerprint()}: "
                "the feature definitions changed since training; retrain or use the matching treeops version"
            )
        late_us = late_us_of(data)
        if isinstance(late_us, bool) or not isinstance(late_us, int):
            raise DataError(f"feature spec {spec.name!r} stored with the model has {LATE_ARRIVAL_KEY} {late_us!r}; it "
                            "must be an integer number of microseconds >= 0: re-export the version")
        spec = dataclasses.replace(spec, late_arrival=late_us * _US)
        return cls(spec, {k: tuple(v) for k, v in data.get("vocabularies", {}).items()})


RAW_SCHEMA: dict[str, pl.DataType] = {
    "transaction_id": pl.Int64(),
    "card_id": pl.Int64(),
    "timestamp": pl.Datetime("us"),
    "amount": pl.Float64(),
    "merchant_category": pl.String(),
    "country": pl.String(),
    "channel": pl.String(),
}

FRAUD_FEATURES = FeatureSpec(
    name="card_transactions_v2",
    raw_schema=RAW_SCHEMA,
    order_by=("timestamp", "transaction_id"),
    features=(
        Feature("log_amount", pl.col("amount").clip(lower_bound=0).log1p(), "log(1 + amount)"),
        Feature("hour_of_day", pl.col("timestamp").dt.hour(), "hour of the transaction, 0-23"),
        Feature("day_of_week", pl.col("timestamp").dt.weekday(), "ISO weekday, 1 = Monday"),
        Feature("is_weekend", (pl.col("timestamp").dt.weekday() >= 6).cast(pl.Int8), "1 on Saturday and Sunday"),
        Feature("merchant_category", pl.col("merchant_category"), "merchant category code", categorical=True),
        Feature("country", pl.col("country"), "country of the merchant", categorical=True),
        Feature("channel", pl.col("channel"), "pos, online or atm", categorical=True),
        history_feature("card_txn_count_1h", History("count", "1h"),
                        "number of the card's transactions in the hour before (strictly earlier times)"),
        history_feature("card_txn_count_24h", History("count", "24h"),
                        "number of the card's transactions in the 24 hours before"),
        history_feature("card_amount_sum_24h", History("sum", "24h", value="amount"),
                        "sum of the card's amounts in the 24 hours before (0 when none)"),
        history_feature("seconds_since_prev_card_txn", History("seconds_since_prev", "30d"),
                        "seconds since the card's previous transaction within 30 days (missing when none)"),
        history_feature("amount_to_card_mean_30d", History("ratio_to_mean", "30d", value="amount"),
                        "amount divided by the mean of the card's amounts in the 30 days before (missing when none)"),
    ),
)

#: Feature specs by name, as stored in each model version's `feature_spec.json`.
SPECS: dict[str, FeatureSpec] = {FRAUD_FEATURES.name: FRAUD_FEATURES}
COLUMNS_SPEC = "columns"


def columns_spec(schema: Mapping[str, pl.DataType], exclude: Sequence[str] = ()) -> FeatureSpec:
    """Every column of a table as a feature: numbers and booleans as they are, text and categories
    through a vocabulary, dates and times as epoch seconds. Names may hold spaces or punctuation."""
    features = []
    raw: dict[str, pl.DataType] = {}
    for name, dtype in schema.items():
        if name in exclude:
            continue
        if dtype.is_numeric() or dtype == pl.Boolean:
            features.append(Feature(name, pl.col(name).cast(pl.Float64), f"column {name!r}"))
            raw[name] = pl.Float64()
        elif dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
            features.append(Feature(name, pl.col(name).cast(pl.String), f"column {name!r}", categorical=True))
            raw[name] = pl.String()
        elif dtype.is_temporal():
            features.append(Feature(name, pl.col(name).cast(pl.Datetime("us")).dt.epoch("s"), f"{name!r} as epoch seconds"))
            raw[name] = pl.Datetime("us")
        else:
            raise DataError(f"column {name!r} has type {dtype}, which cannot be a feature; drop it or cast it")
    if not features:
        raise DataError("the data has no feature columns besides the target")
    return FeatureSpec(COLUMNS_SPEC, raw, tuple(features))


def load_fitted(data: Mapping[str, Any]) -> FittedFeatures:
    """Rebuild the fitted features stored with a model version (see `FittedFeatures.to_dict`)."""
    name = str(data.get("spec"))
    if name == COLUMNS_SPEC:
        schema = {k: _DTYPES[v] for k, v in data["raw_schema"].items()}
        return FittedFeatures.from_dict(columns_spec(schema), data)
    spec = SPECS.get(name)
    if spec is None:
        raise DataError(f"unknown feature spec {name!r}; this treeops knows {sorted(SPECS) + [COLUMNS_SPEC]}")
    return FittedFeatures.from_dict(spec, data)


_DTYPES: dict[str, pl.DataType] = {str(d): d for d in (pl.Float64(), pl.String(), pl.Datetime("us"))}
