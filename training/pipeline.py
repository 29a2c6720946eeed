"""The training facade: data file -> validated raw frame -> trained model -> registered version."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from training import tracking
from training.contract import enforce, fraud_contract, validate_file
from training.errors import DataError, SettingsError
from training.features import COLUMNS_SPEC, FRAUD_FEATURES, SPECS, FeatureSpec, columns_spec
from training.ingest import load_raw, scan_table
from training.train import TrainParams, train_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    """The registered version and its test metrics."""

    registered: tracking.RegisteredModel
    metrics: dict[str, float]
    rows: dict[str, int]

    def to_dict(self) -> dict:
        return {
            "model_name": self.registered.name,
            "version": self.registered.version,
            "alias": self.registered.alias,
            "run_id": self.registered.run_id,
            "metrics": self.metrics,
            "rows": self.rows,
        }


def choose_spec(data: Path | str, target: str, requested: str = "auto") -> FeatureSpec:
    """`auto`: a named spec whose raw columns the file has (e.g. card transactions), else every column."""
    return choose_spec_for_schema(scan_table(data).collect_schema(), target, requested, where=str(data))


def choose_spec_for_schema(schema: Mapping[str, pl.DataType], target: str, requested: str, where: str) -> FeatureSpec:
    """`choose_spec` for a table whose schema is known (e.g. the first file of a Parquet dataset)."""
    if target not in schema:
        raise DataError(f"target column {target!r} is not in {where}; columns: {list(schema)}")
    if requested == "auto":
        # Most of a named spec's columns present: use it, so the data contract names the missing ones.
        fits = [s for s in SPECS.values() if 2 * len(set(s.raw_schema) & set(schema)) >= len(s.raw_schema)]
        return fits[0] if fits else columns_spec(schema, exclude=[target])
    if requested == COLUMNS_SPEC:
        return columns_spec(schema, exclude=[target])
    if requested not in SPECS:
        raise SettingsError(f"unknown feature spec {requested!r}; choose auto, {COLUMNS_SPEC} or one of {sorted(SPECS)}")
    return SPECS[requested]


def train_and_register(
    data: Path | str,
    target: str,
    model_name: str,
    *,
    params: TrainParams = TrainParams(),
    features: str = "auto",
    tracking_uri: str,
    artifact_root: Path | None,
    reports_dir: Path | None = None,
) -> TrainOutcome:
    """Check the data contract, train, then log and register; bad data stops before MLflow is touched.

    A refused file's violation report is written to `reports_dir`; an accepted one's goes into the run.
    """
    spec = choose_spec(data, target, features)
    report = None
    if spec.name == FRAUD_FEATURES.name:
        report = enforce(validate_file(data, fraud_contract(target=target)), reports_dir)
    raw = load_raw(data, spec.raw_schema, (target,))
    result = train_model(raw, spec, target, params, source=str(data))
    tracking.configure(tracking_uri, artifact_root)
    sample = raw.head(1000).collect()
    registered = tracking.log_and_register(result, params, model_name, str(data), sample,
                                           contract=report.to_dict() if report else None)
    return TrainOutcome(registered, result.metrics, result.rows)
