"""A version's training reference, written beside it at export and read by `treeops monitor`.

`reference.parquet`: a seeded sample (at most `MAX_REFERENCE_ROWS`) of the held-out rows as the prediction log
records them: one Float32 column `feature.<name>` per served feature (categories as their codes), `score`
(P(positive class), as served) and `label` (0/1). `reference.json`: the holdout's quality figures over all of its
rows at the served threshold (ROC AUC, PR AUC, precision, recall, log loss, Brier score, expected calibration
error) and what the sample is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from monitoring.errors import MonitoringError

REFERENCE_DATA_FILE = "reference.parquet"
REFERENCE_FILE = "reference.json"
MAX_REFERENCE_ROWS = 20_000
SAMPLE_SEED = 0
CALIBRATION_BINS = 10
"""Equal-width probability bins of the expected calibration error."""
FEATURE_PREFIX = "feature."
RAW_PREFIX = "raw."  # a raw-transaction model's logged input fields (backends/prediction_log.py)
SCORE = "score"
LABEL = "label"


class MissingReferenceError(MonitoringError):
    """A version folder has no training reference (exported before treeops wrote one)."""


def feature_column(name: str) -> str:
    """The prediction log's column of served feature `name` (shared by the log and the reference)."""
    return f"{FEATURE_PREFIX}{name}"


def calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error: mean |observed positive rate - mean score| over equal-width score bins,
    weighted by their rows (0 is perfectly calibrated)."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if not len(scores):
        return float("nan")
    index = np.minimum((scores * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, labels, bins) - np.bincount(index, scores, bins))
    return float(gap.sum() / counts.sum())


def quality_figures(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """The figures the monitor compares: training's binary metrics plus the expected calibration error."""
    from training.objectives import binary_metrics

    return {**binary_metrics(np.asarray(labels), np.asarray(scores), threshold),
            "calibration_error": calibration_error(labels, scores)}


@dataclass(frozen=True)
class Reference:
    """A version's reference sample and holdout figures, as read from its folder."""

    version_dir: Path
    data: pl.DataFrame
    figures: dict[str, float]
    threshold: float
    features: tuple[str, ...]
    categorical: tuple[str, ...]

    @property
    def feature_columns(self) -> list[str]:
        return [feature_column(f) for f in self.features]

    @property
    def version(self) -> int:
        return int(self.version_dir.name)


def write_reference(folder: Path, features: Sequence[str], categorical: Sequence[str], matrix: np.ndarray,
                    labels: np.ndarray, scores: np.ndarray, threshold: float) -> None:
    """Write `reference.parquet` and `reference.json` into `folder` (a staging folder: export renames it whole)."""
    from export.repository import write_json

    labels = np.asarray(labels).astype(np.int8)
    scores = np.asarray(scores, dtype=np.float64)
    frame = pl.DataFrame({feature_column(f): pl.Series(matrix[:, i], dtype=pl.Float32) for i, f in enumerate(features)}
                         | {SCORE: scores, LABEL: labels})
    sample = frame if frame.height <= MAX_REFERENCE_ROWS else frame.sample(MAX_REFERENCE_ROWS, seed=SAMPLE_SEED)
    sample.write_parquet(folder / REFERENCE_DATA_FILE)
    write_json(folder / REFERENCE_FILE, {
        "features": list(features), "categorical": list(categorical), "threshold": threshold,
        "holdout_rows": frame.height, "sample_rows": sample.height, "sample_seed": SAMPLE_SEED,
        "figures": quality_figures(labels, scores, threshold), "calibration_bins": CALIBRATION_BINS,
    })


def read_reference(version_dir: Path) -> Reference:
    """The reference exported with the version in `version_dir`.

    Raises:
        MissingReferenceError: the folder has no reference (an older export) or it cannot be read.
    """
    json_path, data_path = version_dir / REFERENCE_FILE, version_dir / REFERENCE_DATA_FILE
    if not json_path.is_file() or not data_path.is_file():
        raise MissingReferenceError(
            f"{version_dir} has no training reference ({REFERENCE_FILE} + {REFERENCE_DATA_FILE}): it was exported by "
            "an older treeops or is not a binary classifier (only binary ones have one); while no config.pbtxt serves "
            f"it, delete the folder and run `treeops export --version {version_dir.name}` again")
    try:
        meta: dict[str, Any] = json.loads(json_path.read_text())
        data = pl.read_parquet(data_path)
        return Reference(version_dir, data, {k: float(v) for k, v in meta["figures"].items()},
                         float(meta["threshold"]), tuple(meta["features"]), tuple(meta["categorical"]))
    except (OSError, ValueError, KeyError, pl.exceptions.PolarsError) as exc:
        raise MissingReferenceError(f"the training reference in {version_dir} is unreadable: {exc}; while no "
                                    "config.pbtxt serves it, delete the folder and run `treeops export --version "
                                    f"{version_dir.name}` again") from exc
