"""Parity gate: the exported artifact must score like xgboost on held-out and edge-case rows."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import xgboost as xgb

from export.errors import ParityError

log = logging.getLogger(__name__)

Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ParityReport:
    """Outcome of one parity check; `passed` needs both the difference and flip limits met."""

    rows: int
    max_abs_diff: float
    mean_abs_diff: float
    flipped_decisions: int
    tolerance: float
    threshold: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def edge_rows(n_features: int, typical: np.ndarray) -> np.ndarray:
    """Rows a production feed will send sooner or later: all-missing, zeros, extremes, one NaN each."""
    big = np.finfo(np.float32).max / 4
    rows = [np.full(n_features, np.nan), np.zeros(n_features), np.full(n_features, -big), np.full(n_features, big)]
    base = typical if typical.size else np.zeros(n_features)
    for i in range(n_features):
        row = base.copy()
        row[i] = np.nan
        rows.append(row)
    return np.asarray(rows, dtype=np.float32)


def check_parity(
    booster: xgb.Booster, scorer: Scorer, x: np.ndarray, *, tolerance: float = 1e-5, threshold: float = 0.5
) -> ParityReport:
    """Score `x` with xgboost and `scorer`; compare probabilities of the positive class."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    expected = np.asarray(booster.inplace_predict(x), dtype=np.float64).reshape(len(x), -1)
    got = np.asarray(scorer(x), dtype=np.float64).reshape(len(x), -1)
    if got.shape[1] == 2 and expected.shape[1] == 1:
        got = got[:, 1:]
    if got.shape != expected.shape:
        raise ParityError(f"artifact returns shape {got.shape} but xgboost returns {expected.shape} for {len(x)} rows")
    diff = np.abs(got - expected)
    flipped = int(np.sum((got[:, -1] >= threshold) != (expected[:, -1] >= threshold)))
    max_diff = float(np.nanmax(diff)) if diff.size else 0.0
    if np.isnan(diff).any():
        max_diff = float("inf")
    report = ParityReport(len(x), max_diff, float(np.nanmean(diff)) if diff.size else 0.0, flipped,
                          tolerance, threshold, max_diff <= tolerance and flipped == 0)
    log.info("parity on %d rows: max |diff| %.3g, %d flipped", report.rows, report.max_abs_diff, flipped)
    return report


def require(report: ParityReport, what: str) -> None:
    """Raise ParityError naming `what` unless `report` passed."""
    if not report.passed:
        raise ParityError(
            f"{what} does not score like the trained model: max |difference| {report.max_abs_diff:.3g} "
            f"(limit {report.tolerance:g}), {report.flipped_decisions} flipped decisions at threshold "
            f"{report.threshold} over {report.rows} rows; nothing was written"
        )
