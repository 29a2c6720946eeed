"""Parity gate: the exported artifact must score like xgboost on held-out, edge-case and property rows.

The reference is `xgboost.Booster.inplace_predict` on float32 rows (missing = NaN). What is
compared depends on the objective: binary -> the positive-class probability (flips at
`threshold`), multi-class -> all class probabilities (flips = argmax changes), regression ->
the value with a relative tolerance (difference / max(|expected|, 1)).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import xgboost as xgb

from export.errors import ParityError
from export.booster import probability_booster, task_of

log = logging.getLogger(__name__)

Scorer = Callable[[np.ndarray], np.ndarray]

_F32 = np.finfo(np.float32)


@dataclass(frozen=True)
class ParityReport:
    """Outcome of one parity check; `passed` needs both the difference and flip limits met.

    For regression `tolerance` bounds `max_rel_diff`; otherwise it bounds `max_abs_diff`.
    `worst_row` is the input row with the largest difference (values as text, so NaN/inf survive JSON).
    """

    rows: int
    max_abs_diff: float
    mean_abs_diff: float
    flipped_decisions: int
    tolerance: float
    threshold: float
    passed: bool
    task: str = "binary"
    max_rel_diff: float = 0.0
    worst_index: int = -1
    worst_row: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def edge_rows(n_features: int, typical: np.ndarray) -> np.ndarray:
    """Rows a production feed will send sooner or later: all-missing, zeros, extremes, one NaN each."""
    big = _F32.max / 4
    rows = [np.full(n_features, np.nan), np.zeros(n_features), np.full(n_features, -big), np.full(n_features, big)]
    base = typical if typical.size else np.zeros(n_features)
    for i in range(n_features):
        row = base.copy()
        row[i] = np.nan
        rows.append(row)
    return np.asarray(rows, dtype=np.float32)


def split_thresholds(booster: xgb.Booster, n_features: int) -> list[np.ndarray]:
    """Sorted unique float32 split thresholds of every feature (empty where a feature is never split on)."""
    frame = booster.trees_to_dataframe()
    frame = frame[frame["Feature"] != "Leaf"].dropna(subset=["Split"])
    index = {name: i for i, name in enumerate(booster.feature_names or [])}
    found: list[list[float]] = [[] for _ in range(n_features)]
    for feature, split in zip(frame["Feature"], frame["Split"]):
        i = index[feature] if feature in index else int(str(feature).lstrip("f"))
        found[i].append(split)
    # The dataframe prints float32 thresholds with enough digits to round-trip exactly.
    return [np.unique(np.asarray(v, dtype=np.float32)) for v in found]


#: Value kinds of `property_rows` and their weights.
_KINDS = {
    "threshold": 0.22, "threshold_up": 0.1, "threshold_down": 0.1, "nan": 0.1, "pos_inf": 0.04,
    "neg_inf": 0.04, "zero": 0.04, "neg_zero": 0.04, "f32_max": 0.04, "tiny": 0.03, "in_range": 0.2,
    "huge": 0.05,
}


def property_rows(
    booster: xgb.Booster,
    n_features: int,
    n: int = 2000,
    seed: int = 0,
    *,
    categorical: Mapping[int, int] | None = None,
) -> np.ndarray:
    """`n` deterministic rows that probe where converters go wrong.

    Each cell is one of: a split threshold of that feature exactly or one float32 ulp above or
    below, NaN, +/-inf, +0.0, -0.0, +/-float32 max, the smallest subnormal/normal, a value in the
    range of the thresholds, or a huge magnitude. `categorical` maps feature index -> vocabulary
    size; those cells hold known codes, NaN or unseen codes (-1, size, size + 1, 2**24).
    """
    rng = np.random.default_rng(seed)
    thresholds = split_thresholds(booster, n_features)
    weights = np.asarray(list(_KINDS.values()))
    kinds = rng.choice(len(weights), size=(n, n_features), p=weights / weights.sum())
    rows = np.empty((n, n_features), dtype=np.float32)
    for j in range(n_features):
        rows[:, j] = _column(rng, kinds[:, j], thresholds[j])
    for j, size in (categorical or {}).items():
        codes = rng.integers(0, max(size, 1), n).astype(np.float32)
        unseen = np.asarray([-1, size, size + 1, 2**24, np.nan], dtype=np.float32)
        pick = rng.random(n) < 0.3
        codes[pick] = rng.choice(unseen, int(pick.sum()))
        rows[:, j] = codes
    return rows


def _column(rng: np.random.Generator, kinds: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """One feature's cells: `kinds` indexes the value kinds of `_KINDS` (in order)."""
    n = len(kinds)
    if thr.size:
        lo, hi = float(thr[0]), float(thr[-1])
        span = max(hi - lo, 1.0)
        at = thr[rng.integers(0, thr.size, n)]
    else:
        lo, hi, span = -1.0, 1.0, 2.0
        at = rng.normal(size=n).astype(np.float32)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)
    values = {
        "threshold": at,
        "threshold_up": np.nextafter(at, np.float32(np.inf)),
        "threshold_down": np.nextafter(at, np.float32(-np.inf)),
        "nan": np.full(n, np.nan, np.float32),
        "pos_inf": np.full(n, np.inf, np.float32),
        "neg_inf": np.full(n, -np.inf, np.float32),
        "zero": np.zeros(n, np.float32),
        "neg_zero": np.full(n, -0.0, np.float32),
        "f32_max": sign * _F32.max,
        "tiny": sign * np.where(rng.random(n) < 0.5, _F32.smallest_subnormal, _F32.tiny),
        "in_range": rng.uniform(lo - 0.1 * span, hi + 0.1 * span, n).astype(np.float32),
        "huge": (sign * 10.0 ** rng.uniform(4, 37, n)).astype(np.float32),
    }
    table = np.stack([values[k].astype(np.float32) for k in _KINDS])
    return table[kinds, np.arange(n)]


def gate_rows(
    booster: xgb.Booster,
    holdout: np.ndarray,
    *,
    n_property: int = 2000,
    seed: int = 0,
    categorical: Mapping[int, int] | None = None,
) -> np.ndarray:
    """Held-out rows + `edge_rows` + `property_rows`: the rows the export gate scores."""
    holdout = np.asarray(holdout, dtype=np.float32).reshape(len(holdout), -1)
    n_features = holdout.shape[1] if holdout.size else booster.num_features()
    typical = np.nanmedian(holdout, axis=0) if len(holdout) else np.zeros(n_features)
    parts = [holdout, edge_rows(n_features, typical),
             property_rows(booster, n_features, n_property, seed, categorical=categorical)]
    return np.ascontiguousarray(np.vstack([p for p in parts if len(p)]), dtype=np.float32)


def reference_scores(booster: xgb.Booster, x: np.ndarray) -> np.ndarray:
    """xgboost's scores as served, [rows, k]: P(positive) for binary, class probabilities, or the value."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.asarray(probability_booster(booster).inplace_predict(x), dtype=np.float64).reshape(len(x), -1)


def check_parity(
    booster: xgb.Booster, scorer: Scorer, x: np.ndarray, *, tolerance: float = 1e-5, threshold: float = 0.5
) -> ParityReport:
    """Score `x` with xgboost and `scorer` and compare them as the objective requires (module docstring)."""
    task = task_of(booster)
    x = np.ascontiguousarray(x, dtype=np.float32)
    expected = reference_scores(booster, x)
    got = np.asarray(scorer(x), dtype=np.float64).reshape(len(x), -1)
    if task == "binary" and got.shape[1] == 2 and expected.shape[1] == 1:
        got = got[:, 1:]
    if got.shape != expected.shape:
        raise ParityError(f"artifact returns shape {got.shape} but xgboost returns {expected.shape} for {len(x)} rows")
    diff = np.abs(got - expected)
    diff[np.isnan(diff)] = np.inf  # a NaN score where xgboost has a number is a failure, never a pass
    rel = diff / np.maximum(np.abs(expected), 1.0)
    if task == "binary":
        flipped = int(np.sum((got[:, -1] >= threshold) != (expected[:, -1] >= threshold)))
    elif task == "multiclass":
        flipped = int(np.sum(np.argmax(got, axis=1) != np.argmax(expected, axis=1))) if len(x) else 0
    else:
        flipped = 0
    per_row = (rel if task == "regression" else diff).max(axis=1) if diff.size else np.zeros(0)
    worst = int(np.argmax(per_row)) if per_row.size else -1
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    limited = max_rel if task == "regression" else max_abs
    report = ParityReport(
        rows=len(x), max_abs_diff=max_abs, mean_abs_diff=float(np.mean(diff[np.isfinite(diff)])) if diff.size else 0.0,
        flipped_decisions=flipped, tolerance=tolerance, threshold=threshold,
        passed=bool(limited <= tolerance and flipped == 0), task=task, max_rel_diff=max_rel, worst_index=worst,
        worst_row=tuple(repr(float(v)) for v in x[worst]) if worst >= 0 else (),
    )
    log.info("parity (%s) on %d rows: max |diff| %.3g, max rel %.3g, %d flipped", task, report.rows,
             max_abs, max_rel, flipped)
    return report


def require(report: ParityReport, what: str) -> None:
    """Raise ParityError naming `what` unless `report` passed."""
    if not report.passed:
        measure = "relative difference" if report.task == "regression" else "|difference|"
        value = report.max_rel_diff if report.task == "regression" else report.max_abs_diff
        raise ParityError(
            f"{what} does not score like the trained model: max {measure} {value:.3g} "
            f"(limit {report.tolerance:g}), {report.flipped_decisions} flipped decisions at threshold "
            f"{report.threshold} over {report.rows} rows (worst: row {report.worst_index} = "
            f"[{', '.join(report.worst_row)}]); nothing was written"
        )
