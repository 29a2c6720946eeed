"""Load the online store from historical transactions, so an entity's first live transaction sees its history.

The state written is exactly the one `OnlineHistory.features` leaves after seeing the file's rows one by
one in timestamp order (ties: file order): per entity, the arrival counter = its number of rows, and the
members and transaction records of the rows within the retention (longest window + the spec's late
allowance) of its newest time, each with its arrival number. It replaces the state of every entity in the file, so a
re-run gives the same state. Rows without an entity or a time are in nobody's history, as offline.

Memory stays bounded: the file is scanned lazily, once for each entity's row count and newest time, then
once per partition of entities (hash of the entity, `partition_rows` rows each at most), and written in
pipelined batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import redis

from backends.online_history import OnlineHistory, entity_token, redacted
from online_store.errors import StoreUnavailableError
from online_store.spec import online_history
from training.dataset import partition_of
from training.features import FittedFeatures
from training.ingest import load_raw

ROW = "__row"
SEQ = "__seq"


@dataclass(frozen=True)
class BackfillResult:
    """rows: transactions read; entities: their entities; stored: members kept (within the retention);
    store_url: the store written, without its password."""

    rows: int
    entities: int
    stored: int
    seconds: float
    store_url: str

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"store_url": self.store_url, "rows": self.rows, "entities": self.entities, "stored": self.stored,
                "seconds": self.seconds, "rows_per_s": self.rows_per_s}

    def lines(self) -> list[str]:
        return [f"backfilled {self.rows:,} transactions of {self.entities:,} entities into {self.store_url} "
                f"({self.stored:,} kept within the windows) in {self.seconds:.2f} s: {self.rows_per_s:,.0f} rows/s"]


def backfill(url: str, fitted: FittedFeatures, data_path: Path | str, *, client: redis.Redis | None = None,
             partition_rows: int = 2_000_000, batch_rows: int = 20_000) -> BackfillResult:
    """Write the history state of the transactions in `data_path` (CSV or Parquet with the spec's raw fields)
    into the store at `url`; see the module docstring."""
    start = time.perf_counter()
    owned = client is None
    client = client or redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
    history = online_history(fitted, client, url)
    try:
        rows, entities, stored = _load(history, _scan(fitted, history, data_path), partition_rows, batch_rows)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailableError(url, exc, " during backfill",
                                    ", then run backfill again (it replaces what it wrote)") from exc
    finally:
        history.close()
        if owned:
            client.close()
    return BackfillResult(rows, entities, stored, time.perf_counter() - start, redacted(url))


def _scan(fitted: FittedFeatures, history: OnlineHistory, data_path: Path | str) -> pl.LazyFrame:
    """The columns the state needs, typed from the raw schema, with the file order and epoch-us times."""
    needed = dict.fromkeys([history.entity, history.time, "transaction_id", *history.value_columns])
    schema = {c: fitted.spec.raw_schema[c] for c in needed}
    return (
        load_raw(data_path, schema)
        .with_row_index(ROW)
        .filter(pl.col(history.entity).is_not_null() & pl.col(history.time).is_not_null())
        .with_columns(pl.col(history.time).cast(pl.Datetime("us")).dt.epoch("us").alias(history.time),
                      *[pl.col(c).cast(pl.Float64) for c in history.value_columns])
    )


def _load(history: OnlineHistory, lf: pl.LazyFrame, partition_rows: int, batch_rows: int) -> tuple[int, int, int]:
    e, t = history.entity, history.time
    totals = lf.select(pl.len().alias("rows"), pl.col(e).n_unique().alias("entities")).collect()
    rows, entities = int(totals["rows"][0]), int(totals["entities"][0])
    parts = max(1, math.ceil(rows / partition_rows))
    stored = 0
    for part in range(parts):
        frame = (
            lf.filter(partition_of(pl.col(e), parts) == part)
            .sort([e, t, ROW])
            .with_columns(pl.int_range(1, pl.len() + 1).over(e).alias(SEQ),
                          pl.col(t).max().over(e).alias("__newest"),
                          pl.len().over(e).alias("__count"))
            .filter(pl.col(t) >= pl.col("__newest") - history.retention_us)
            .collect()
        )
        stored += frame.height
        _write(history, frame, batch_rows)
    return rows, entities, stored


def _write(history: OnlineHistory, frame: pl.DataFrame, batch_rows: int) -> None:
    """Replace each entity's keys with its members, records and counter; pipelined, `batch_rows` per trip."""
    if frame.is_empty():
        return
    e, t = history.entity, history.time
    times = frame[t].to_numpy()
    data = history.data(times, {c: frame[c].to_numpy() for c in history.value_columns})
    packed = np.column_stack([data, frame[SEQ].to_numpy().astype("<f8")]).astype("<f8")
    width = packed.shape[1] * 8
    blob = packed.tobytes()
    members = [blob[i:i + width] for i in range(0, len(blob), width)]
    txns = [entity_token(x) for x in frame["transaction_id"].to_list()]
    fields = [b"t:" + x for x in txns]
    scores = times.tolist()
    counts = frame["__count"].to_list()
    ids = frame[e].to_list()
    bounds = np.flatnonzero(np.diff(frame[e].rle_id().to_numpy(), prepend=-1)).tolist() + [frame.height]
    pipe = history.client.pipeline(transaction=False)
    pending = 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        z, tz, h = history.keys(ids[a])
        zargs: list = [None] * (2 * (b - a))
        zargs[0::2], zargs[1::2] = scores[a:b], members[a:b]
        targs: list = [None] * (2 * (b - a))
        targs[0::2], targs[1::2] = scores[a:b], txns[a:b]
        hargs: list = [None] * (2 * (b - a))
        hargs[0::2], hargs[1::2] = fields[a:b], members[a:b]
        pipe.execute_command("DEL", z, tz, h)
        pipe.execute_command("ZADD", z, *zargs)
        pipe.execute_command("ZADD", tz, *targs)
        pipe.execute_command("HSET", h, "seq", counts[a], *hargs)
        pending += b - a
        if pending >= batch_rows:
            pipe.execute()
            pending = 0
    pipe.execute()

