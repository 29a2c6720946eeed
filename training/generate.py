"""Seeded generator of card transactions whose fraud label depends on the engineered features.

Compromised cards show bursts: several transactions minutes apart, with amounts high relative to
the card's usual ones. The label is drawn from a logistic function of the spec's computed features
(one definition), so the history features (counts in 1 h / 24 h, time since the previous
transaction, amount relative to the 30-day mean) carry signal the stateless ones do not.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from training.features import FRAUD_FEATURES, RAW_SCHEMA

log = logging.getLogger(__name__)

MERCHANT_CATEGORIES = (
    "grocery", "fuel", "restaurant", "travel", "electronics", "fashion",
    "pharmacy", "entertainment", "digital_goods", "utilities", "gambling", "jewelry",
)
COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "BR", "NG", "RU")
CHANNELS = ("pos", "online", "atm")
START = dt.datetime(2026, 1, 1)
SPAN_DAYS = 90
_START_US = int((START - dt.datetime(1970, 1, 1)).total_seconds()) * 1_000_000


@dataclass(frozen=True)
class GenerateSpec:
    """What to generate.

    rows: number of transactions; seed: RNG seed (same seed, same file);
    drift: 0 for the training distribution, up to 1 for a strongly shifted batch
    (larger amounts, more night-time, online, foreign and rare-merchant traffic, more bursts);
    fraud_rate: target base rate; start, span_days: the period the timestamps cover (a later
    period for the same cards continues their history).
    """

    rows: int
    seed: int = 7
    drift: float = 0.0
    fraud_rate: float = 0.015
    start: dt.datetime = START
    span_days: int = SPAN_DAYS


def generate_transactions(spec: GenerateSpec, *, first_id: int = 1, first_card: int = 0) -> pl.DataFrame:
    """Return `spec.rows` transactions with an `is_fraud` label near `spec.fraud_rate`.

    Ids start at `first_id` and cards at `first_card`, so chunks with disjoint cards can be
    generated one at a time and concatenated (a card's history stays within its chunk).
    """
    if spec.rows < 1:
        raise ValueError(f"rows must be >= 1, got {spec.rows}")
    rng = np.random.default_rng(spec.seed)
    n = spec.rows
    n_cards = max(1, n // 40)
    span = spec.span_days * 86_400
    # Bursts: a few transactions of one card minutes apart, large and mostly online / risky merchants.
    n_burst = min(n - 1, int(n * (0.03 + 0.03 * spec.drift)))
    sizes = rng.integers(2, 9, n_burst // 2 + 1)  # enough bursts to cover n_burst rows
    owner = np.repeat(np.arange(len(sizes)), sizes)[:n_burst]
    burst_start = rng.integers(0, span, len(sizes))
    gap = np.round(rng.exponential(240, n_burst)).astype(np.int64)
    offset = np.cumsum(gap) - np.concatenate(([0], np.cumsum(gap)))[np.r_[0, np.cumsum(sizes)][owner]]
    burst = np.zeros(n, bool)
    burst[n - n_burst:] = True
    card = rng.integers(0, n_cards, n)
    card[burst] = rng.integers(0, n_cards, len(sizes))[owner]
    home = rng.integers(0, 5, n_cards)[card]  # most cards live in the first five countries
    foreign = rng.random(n) < 0.05 + 0.25 * spec.drift
    country = np.where(foreign, rng.integers(0, len(COUNTRIES), n), home)
    channel_p = np.array([0.6 - 0.3 * spec.drift, 0.3 + 0.3 * spec.drift, 0.1])
    channel = rng.choice(len(CHANNELS), n, p=channel_p / channel_p.sum())
    channel[burst] = np.where(rng.random(n_burst) < 0.4, CHANNELS.index("online"), channel[burst])
    k = len(MERCHANT_CATEGORIES)
    merchant = rng.choice(k, n, p=(1 - spec.drift) * _zipf_weights(k) + spec.drift / k)
    risky = np.array([MERCHANT_CATEGORIES.index(m) for m in ("electronics", "digital_goods", "jewelry")])
    merchant[burst] = np.where(rng.random(n_burst) < 0.3, rng.choice(risky, n_burst), merchant[burst])
    # Each card has its usual spend level; a burst spends well above that card's level.
    level = rng.normal(3.3 + 0.8 * spec.drift, 0.8, n_cards)[card] + np.where(burst, 1.5, 0.0)
    amount = np.round(np.exp(rng.normal(level, np.where(burst, 0.5, 0.7))), 2)
    # Seconds-resolution timestamps give real ties (equal timestamps never see each other).
    second_of_day = rng.integers(0, 86_400, n)
    night = rng.random(n) < 0.4 * spec.drift
    second_of_day[night] = rng.integers(0, 6 * 3_600, int(night.sum()))
    seconds = rng.integers(0, spec.span_days, n) * 86_400 + second_of_day
    seconds[burst] = np.minimum(burst_start[owner] + offset, span - 1)
    order = np.argsort(seconds, kind="stable")
    start_us = int((spec.start - dt.datetime(1970, 1, 1)).total_seconds()) * 1_000_000
    raw = pl.DataFrame(
        {
            "transaction_id": np.arange(first_id, first_id + n, dtype=np.int64),
            "card_id": (card[order] + first_card).astype(np.int64),
            "timestamp": pl.Series((start_us + seconds[order] * 1_000_000).astype(np.int64)).cast(pl.Datetime("us")),
            "amount": amount[order],
            "merchant_category": np.asarray(MERCHANT_CATEGORIES)[merchant[order]],
            "country": np.asarray(COUNTRIES)[country[order]],
            "channel": np.asarray(CHANNELS)[channel[order]],
        },
        schema=RAW_SCHEMA,
    )
    label = _draw_labels(raw, rng, spec.fraud_rate)
    return raw.with_columns(is_fraud=pl.Series(label, dtype=pl.Int8))


def write_transactions(frame: pl.DataFrame, out: Path) -> Path:
    """Write `frame` to `out` (.parquet or .csv) through a temp file renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".parquet":
        frame.write_parquet(tmp)
    elif out.suffix == ".csv":
        frame.write_csv(tmp)
    else:
        raise ValueError(f"{out}: unsupported extension {out.suffix!r}; use .parquet or .csv")
    tmp.replace(out)
    log.info("wrote %d rows to %s", frame.height, out)
    return out


def generate_to_file(spec: GenerateSpec, out: Path, chunk_rows: int = 1_000_000) -> Path:
    """Generate `spec.rows` transactions into `out` a chunk at a time (bounded memory at any size).

    Up to `chunk_rows` rows the file equals `write_transactions(generate_transactions(spec), out)`.
    """
    if spec.rows <= chunk_rows:
        return write_transactions(generate_transactions(spec), out)
    if out.suffix not in (".parquet", ".csv"):
        raise ValueError(f"{out}: unsupported extension {out.suffix!r}; use .parquet or .csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    done, card, chunk = 0, 0, 0
    writer = None
    try:
        with open(tmp, "wb") as fh:
            while done < spec.rows:
                rows = min(chunk_rows, spec.rows - done)
                part = generate_transactions(replace(spec, rows=rows, seed=spec.seed + 7919 * chunk),
                                             first_id=done + 1, first_card=card)
                if out.suffix == ".parquet":
                    table = part.to_arrow()
                    writer = writer or pq.ParquetWriter(fh, table.schema)
                    writer.write_table(table)
                else:
                    part.write_csv(fh, include_header=chunk == 0)
                done, card, chunk = done + rows, card + max(1, rows // 40), chunk + 1
            if writer is not None:
                writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %d rows to %s in %d chunks", spec.rows, out, chunk)
    return out


def _zipf_weights(k: int) -> np.ndarray:
    w = 1.0 / np.arange(1, k + 1)
    return w / w.sum()


def _draw_labels(raw: pl.DataFrame, rng: np.random.Generator, rate: float) -> np.ndarray:
    """Fraud probability is a logistic function of the engineered features (one definition)."""
    f = FRAUD_FEATURES.compute(raw.lazy()).collect()
    risky = {"electronics": 1.0, "digital_goods": 1.2, "jewelry": 1.1, "gambling": 0.9}
    gap = np.nan_to_num(f["seconds_since_prev_card_txn"].to_numpy(), nan=30 * 86_400)
    ratio = np.nan_to_num(f["amount_to_card_mean_30d"].to_numpy(), nan=1.0)
    hour = f["hour_of_day"].to_numpy()
    score = (
        0.3 * (f["log_amount"].to_numpy() - 3.3)
        + 1.0 * ((hour <= 5) | (hour >= 23))
        + 0.6 * (raw["channel"] == "online").to_numpy()
        + 0.8 * (raw["country"].is_in(COUNTRIES[5:])).to_numpy()
        + 0.6 * raw["merchant_category"].replace_strict(risky, default=0.0, return_dtype=pl.Float64).to_numpy()
        + 0.2 * f["is_weekend"].to_numpy()
        # history: bursts within the hour, spend in the last day, amount against the card's 30-day mean
        + 1.8 * np.log1p(f["card_txn_count_1h"].to_numpy())
        + 0.4 * np.log1p(f["card_txn_count_24h"].to_numpy())
        + 0.3 * np.log1p(f["card_amount_sum_24h"].to_numpy() / 100)
        + 1.2 * np.log1p(np.clip(ratio, 0, 50))
        + 1.0 * (gap < 900)
    )
    score = score + rng.normal(0, 0.5, len(score))
    # Pick the intercept so the mean probability lands on the target base rate.
    lo, hi = -30.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(score + mid)))) > rate:
            hi = mid
        else:
            lo = mid
    p = 1 / (1 + np.exp(-(score + lo)))
    return (rng.random(len(p)) < p).astype(np.int8)
