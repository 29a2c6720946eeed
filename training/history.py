"""History features declared once: per-entity, time-windowed aggregates of earlier transactions.

The rule (shared by training, backfill and the online store):

- For transaction i of entity e at time t, its history H(i) is the entity's transactions j that
  arrived before i and have ``t - window <= t_j < t``: the window start is included, the window end
  is not, so transactions with equal timestamps never see each other (whatever their order).
- Offline (training, backfill) arrival order is timestamp order, so H(i) is simply every earlier
  timestamp within the window; `History.expr` computes that and does not depend on row order.
- Online, a transaction that arrives late (timestamp older than ones already seen) gets a score
  from the history that arrived before it, and never changes a score already given.
  `as_arrived` is the reference for any arrival order.
- The online store keeps an entity's transactions back to its newest time minus (the entity's longest
  window + the spec's late allowance `FeatureSpec.late_arrival`, `late_us` below; default 1 day), so a
  transaction arriving more than `late_us` behind its entity's newest one sees only that kept part of its
  window: H(i) also requires
  t_j >= max(t_k of the entity's transactions k that arrived before i) - longest window - late_us.
  `as_arrived(..., late_us=spec.late_arrival_us)` applies it. In timestamp order (training, backfill) it
  never removes anything.
- Aggregates over H(i), all float64: count = |H| (0 when empty); sum of the values (0.0 when
  empty); mean = sum / count (NaN when empty); seconds_since_prev = (t - max t_j) / 1e6, in seconds
  (NaN when empty); ratio_to_mean = value_i / mean (NaN when empty or mean == 0).
- The sum is added left to right in (t_j, value_j) order, so it is one exact float64 number for a
  given history, independent of arrival order and engine.
- Every history feature has a window (seconds_since_prev too: "time since the previous one within 30 d").
  Rows whose entity or time is null get NaN and are in nobody's history; a null value counts as NaN.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import polars as pl

from training.errors import DataError

if TYPE_CHECKING:
    from training.features import Feature

Aggregate = Literal["count", "sum", "mean", "seconds_since_prev", "ratio_to_mean"]
_NEEDS_VALUE = ("sum", "mean", "ratio_to_mean")
_UNIT_US = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000,
            "w": 7 * 86_400_000_000}
_PART = re.compile(r"(\d+)(us|ms|s|m|h|d|w)")


@dataclass(frozen=True)
class History:
    """One history aggregate: `aggregate` of `value` over the `entity`'s transactions in the `window`
    (a Polars duration string such as "1h", "24h", "30d") before `time` (see the module rules)."""

    aggregate: Aggregate
    window: str
    entity: str = "card_id"
    time: str = "timestamp"
    value: str | None = None

    def __post_init__(self) -> None:
        if self.aggregate not in get_args(Aggregate):
            raise DataError(f"unknown history aggregate {self.aggregate!r}; choose one of {get_args(Aggregate)}")
        if (self.value is None) == (self.aggregate in _NEEDS_VALUE):
            need = "needs a value column" if self.value is None else "takes no value column; set value=None"
            raise DataError(f"history aggregate {self.aggregate!r} {need}")
        self.window_us  # noqa: B018 - validates the window string

    @property
    def window_us(self) -> int:
        """The window in microseconds (calendar units such as "1mo" are refused: their length varies)."""
        parts = _PART.findall(self.window)
        if not parts or "".join(n + u for n, u in parts) != self.window or (us := _window_us(parts)) <= 0:
            raise DataError(f"history window {self.window!r} is not a positive fixed duration; "
                            "write it like '1h', '24h', '30d' or '1h30m' (units us, ms, s, m, h, d, w)")
        return us

    def expr(self) -> pl.Expr:
        """Offline Polars expression: the aggregate over every earlier timestamp within the window
        (arrival order = timestamp order), float64, in input row order."""
        cols = [self.entity, self.time] + ([self.value] if self.value else [])
        return pl.struct(cols).map_batches(self._compute, return_dtype=pl.Float64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe declaration, stored with every model version (the online store reads it)."""
        return {"aggregate": self.aggregate, "window": self.window, "window_us": self.window_us,
                "entity": self.entity, "time": self.time, "value": self.value}

    def _compute(self, rows: pl.Series) -> pl.Series:
        frame = rows.struct.unnest()
        entity, t, v, valid = _columns(frame, self)
        out = np.full(len(frame), np.nan)
        idx = np.flatnonzero(valid)
        if idx.size:
            out[idx] = _windowed(self.aggregate, self.window_us, entity[idx], t[idx], v[idx])
        return pl.Series(out, dtype=pl.Float64)


def as_arrived(raw: pl.DataFrame, features: Sequence[Feature], arrival: str,
               late_us: int | None = None) -> pl.DataFrame:
    """Reference: every feature of `raw` in input row order, each history feature computed with
    H(i) = the entity's rows whose `arrival` (a unique, orderable column) is smaller than i's and
    whose time is in [t - window, t). With arrival = timestamp order this equals `History.expr`.
    `late_us`: the online store's late allowance (the spec's `late_arrival_us`); H(i) then also leaves out
    what the store no longer keeps when i arrives (the longest window is that of `features` on the same
    entity and time; see the module rules). None: the rule alone, as if the store kept everything."""
    if raw[arrival].null_count() or raw[arrival].n_unique() != raw.height:
        raise DataError(f"arrival column {arrival!r} must be unique and non-null: it orders the rows as they arrived")
    order = raw[arrival].arg_sort().to_numpy()
    longest: dict[tuple[str, str], int] = defaultdict(int)
    for f in features:
        if f.history is not None:
            key = (f.history.entity, f.history.time)
            longest[key] = max(longest[key], f.history.window_us)
    cols = {}
    for f in features:
        if f.history is None:
            cols[f.name] = raw.select(f.expr.alias(f.name)).to_series()
            continue
        entity, t, v, valid = _columns(raw, f.history)
        seen: dict[Any, list[tuple[int, float]]] = defaultdict(list)
        newest: dict[Any, int] = {}
        out = np.full(raw.height, np.nan)
        w = f.history.window_us
        kept = None if late_us is None else longest[(f.history.entity, f.history.time)] + int(late_us)
        for i in order:
            if not valid[i]:
                continue
            e, ti = entity[i], int(t[i])
            start = ti - w if kept is None or e not in newest else max(ti - w, newest[e] - kept)
            h = sorted((tj, vj) for tj, vj in seen[e] if start <= tj < ti)
            out[i] = _aggregate(f.history.aggregate, ti, float(v[i]), [tj for tj, _ in h], [vj for _, vj in h])
            seen[e].append((ti, float(v[i])))
            newest[e] = max(newest.get(e, ti), ti)
        cols[f.name] = pl.Series(f.name, out, dtype=pl.Float64)
    return pl.DataFrame(cols)


def _window_us(parts: list[tuple[str, str]]) -> int:
    return sum(int(n) * _UNIT_US[u] for n, u in parts)


def _columns(frame: pl.DataFrame, h: History) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Entity, time (epoch microseconds, int64), value (float64, NaN for null; 0 without a value column)
    and the mask of rows that have an entity and a time."""
    time = frame[h.time]
    if not time.dtype.is_temporal():
        raise DataError(f"history time column {h.time!r} has type {time.dtype}; it must be a Datetime")
    t_us = time.cast(pl.Datetime("us")).dt.epoch("us")
    valid = (frame[h.entity].is_not_null() & t_us.is_not_null()).to_numpy()
    t = t_us.fill_null(0).to_numpy().astype(np.int64)
    v = (frame[h.value].cast(pl.Float64).fill_null(float("nan")).to_numpy() if h.value
         else np.zeros(len(frame)))
    return frame[h.entity].to_numpy(), t, np.asarray(v, dtype=np.float64), valid


def _aggregate(aggregate: str, t: int, v: float, hist_t: list[int], hist_v: list[float]) -> float:
    """One row's aggregate over its history, given in (time, value) order: the rule, row by row."""
    n = len(hist_t)
    if aggregate == "count":
        return float(n)
    if aggregate == "seconds_since_prev":
        return (t - hist_t[-1]) / 1e6 if n else float("nan")
    total = 0.0
    for x in hist_v:
        total += x
    if aggregate == "sum":
        return total
    mean = total / n if n else float("nan")
    if aggregate == "mean":
        return mean
    return v / mean if n and mean != 0 else float("nan")


def _windowed(aggregate: str, window_us: int, entity: np.ndarray, t: np.ndarray, v: np.ndarray) -> np.ndarray:
    """`_aggregate` for every row at once, offline (history = earlier timestamps in the window)."""
    n = len(t)
    # Sort by (entity, time, value): a total order up to identical rows, so the result is exact.
    codes = np.unique(entity, return_inverse=True)[1].ravel().astype(np.int64)
    order = np.lexsort((v, t, codes))
    c, ts, vs = codes[order], t[order], v[order]
    # Rank times globally so (entity code, time rank) packs into one int64 search key.
    uniq = np.unique(ts)
    width = len(uniq) + 1
    key = c * width + np.searchsorted(uniq, ts)
    start = np.searchsorted(key, c * width + np.searchsorted(uniq, ts - window_us, "left"), "left")
    end = np.searchsorted(key, key, "left")  # first row of the same entity and time: ties excluded
    count = (end - start).astype(np.float64)
    res = np.empty(n)
    if aggregate == "count":
        res = count
    elif aggregate == "seconds_since_prev":
        res = np.where(end > start, (ts - ts[np.maximum(end - 1, 0)]) / 1e6, np.nan)
    else:
        total = _window_sums(vs, start, end)
        mean = np.divide(total, count, out=np.full(n, np.nan), where=count > 0)
        if aggregate == "sum":
            res = total
        elif aggregate == "mean":
            res = mean
        else:
            res = np.divide(vs, mean, out=np.full(n, np.nan), where=(count > 0) & (mean != 0))
    out = np.empty(n)
    out[order] = res
    return out


def _window_sums(v: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """sum(v[start[i]:end[i]]) added left to right (as `_aggregate` does), vectorized over rows.
    Work is proportional to the total history size (rows x values per window), like the online read."""
    length = end - start
    by_len = np.argsort(-length, kind="stable")
    neg_lens, first = -length[by_len], start[by_len]
    acc = np.zeros(len(v))
    for k in range(int(-neg_lens[0]) if len(v) else 0):
        m = np.searchsorted(neg_lens, -k, "left")  # rows with more than k values come first
        acc[:m] += v[first[:m] + k]
    total = np.empty(len(v))
    total[by_len] = acc
    return total
