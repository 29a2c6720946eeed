"""The training facade: data file -> validated raw frame -> trained model -> registered version."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from training import tracking
from training.features import FRAUD_FEATURES, FeatureSpec
from training.ingest import load_raw
from training.train import TrainParams, train_classifier

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


def train_and_register(
    data: Path,
    target: str,
    model_name: str,
    *,
    params: TrainParams = TrainParams(),
    spec: FeatureSpec = FRAUD_FEATURES,
    tracking_uri: str,
    artifact_root: Path | None,
) -> TrainOutcome:
    """Validate `data`, train, then log and register; bad data stops before MLflow is touched."""
    raw = load_raw(data, spec.raw_schema, (target,))
    result = train_classifier(raw, spec, target, params)
    tracking.configure(tracking_uri, artifact_root)
    sample = raw.head(1000).collect()
    registered = tracking.log_and_register(result, params, model_name, str(data), sample)
    return TrainOutcome(registered, result.metrics, result.rows)
