"""Seeded generator of card transactions whose fraud label depends on the engineered features."""

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
    (larger amounts, more night-time, online, foreign and rare-merchant traffic);
    fraud_rate: target base rate.
    """

    rows: int
    seed: int = 7
    drift: float = 0.0
    fraud_rate: float = 0.015


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
    card = rng.integers(0, n_cards, n)
    home = rng.integers(0, 5, n_cards)[card]  # most cards live in the first five countries
    foreign = rng.random(n) < 0.05 + 0.25 * spec.drift
    country = np.where(foreign, rng.integers(0, len(COUNTRIES), n), home)
    channel_p = np.array([0.6 - 0.3 * spec.drift, 0.3 + 0.3 * spec.drift, 0.1])
    channel = rng.choice(len(CHANNELS), n, p=channel_p / channel_p.sum())
    k = len(MERCHANT_CATEGORIES)
    merchant = rng.choice(k, n, p=(1 - spec.drift) * _zipf_weights(k) + spec.drift / k)
    amount = np.round(np.exp(rng.normal(3.3 + 0.8 * spec.drift, 1.1, n)), 2)
    # Seconds-resolution timestamps give real ties; the feature spec must break them by id.
    second_of_day = rng.integers(0, 86_400, n)
    night = rng.random(n) < 0.4 * spec.drift
    second_of_day[night] = rng.integers(0, 6 * 3_600, int(night.sum()))
    seconds = np.sort(rng.integers(0, SPAN_DAYS, n) * 86_400 + second_of_day)
    raw = pl.DataFrame(
        {
            "transaction_id": np.arange(first_id, first_id + n, dtype=np.int64),
            "card_id": (card + first_card).astype(np.int64),
            "timestamp": pl.Series((_START_US + seconds * 1_000_000).astype(np.int64)).cast(pl.Datetime("us")),
            "amount": amount,
            "merchant_category": np.asarray(MERCHANT_CATEGORIES)[merchant],
            "country": np.asarray(COUNTRIES)[country],
            "channel": np.asarray(CHANNELS)[channel],
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
    gap = np.nan_to_num(f["seconds_since_prev_card_txn"].to_numpy(), nan=86_400 * 7)
    ratio = np.nan_to_num(f["amount_to_card_mean_30d"].to_numpy(), nan=1.0)
    hour = f["hour_of_day"].to_numpy()
    score = (
        0.9 * (f["log_amount"].to_numpy() - 3.3)
        + 1.3 * ((hour <= 5) | (hour >= 23))
        + 0.9 * np.log1p(np.clip(ratio, 0, 50))
        + 1.2 * (gap < 600)
        + 0.8 * (raw["channel"] == "online").to_numpy()
        + 1.0 * (raw["country"].is_in(COUNTRIES[5:])).to_numpy()
        + raw["merchant_category"].replace_strict(risky, default=0.0, return_dtype=pl.Float64).to_numpy()
        + 0.3 * f["is_weekend"].to_numpy()
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
