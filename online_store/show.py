"""What the store holds for one entity, and the features its next transaction would get (read-only)."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from backends.online_history import StoreUnavailable, decode_member, redacted
from online_store.errors import InvalidStoreArgumentError, StoreUnavailableError
from online_store.spec import online_history
from training.features import FittedFeatures

#: The transaction id `show` asks with: never a real one, so the read is a plain "what would it get".
PROBE_ID = "\x00treeops-show"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class EntityState:
    """members: (time_us, transaction id, seq, {value column: value}) oldest first; arrivals: the arrival
    counter; features: the history features a new transaction at `at_us` with `values` would get;
    store_url: the store read, without its password."""

    entity: str
    value: str
    arrivals: int
    members: list[tuple[int, str, int, dict[str, float]]]
    at_us: int
    values: dict[str, float]
    features: dict[str, float]
    store_url: str

    def lines(self) -> list[str]:
        """A human summary: the members, oldest first, then the features."""
        out = [f"{self.entity}={self.value}: {self.arrivals} transactions arrived, {len(self.members)} kept "
               "(within the longest window, oldest first)"]
        for t, txn, seq, vals in self.members:
            shown = " ".join(f"{k}={v!r}" for k, v in vals.items())
            out.append(f"  {_iso(t)}  transaction {txn}  arrival {seq}  {shown}".rstrip())
        given = " ".join(f"{k}={v!r}" for k, v in self.values.items())
        out.append(f"a new transaction at {_iso(self.at_us)} {given} would get:".replace("  ", " "))
        out += [f"  {k} = {v!r}" for k, v in self.features.items()]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-safe: a missing value or feature (NaN) is None (null)."""
        return {"store_url": self.store_url, "entity": self.entity, "value": self.value, "arrivals": self.arrivals,
                "at_us": self.at_us, "values": _nulls(self.values), "features": _nulls(self.features),
                "members": [{"time_us": t, "transaction_id": txn, "seq": seq, "values": _nulls(v)}
                            for t, txn, seq, v in self.members]}


def _nulls(numbers: Mapping[str, float]) -> dict[str, float | None]:
    """NaN as None, so the dict is strict JSON (json.dumps would write NaN)."""
    return {k: None if math.isnan(v) else v for k, v in numbers.items()}


def parse_pair(text: str, what: str) -> tuple[str, str]:
    """`NAME=VALUE` split in two; InvalidStoreArgumentError naming `what` otherwise."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise InvalidStoreArgumentError(f"{what} {text!r}: write it as NAME=VALUE, e.g. card_id=123")
    return name, value


def parse_values(pairs: list[str]) -> dict[str, float]:
    """`--value NAME=X` options as numbers."""
    out = {}
    for pair in pairs:
        name, text = parse_pair(pair, "--value")
        try:
            out[name] = float(text)
        except ValueError as exc:
            raise InvalidStoreArgumentError(f"--value {pair!r}: {text!r} is not a number") from exc
    return out


def check_entity(fitted: FittedFeatures, name: str) -> None:
    """Refuse an entity column the spec's history features are not keyed by."""
    keyed = sorted({f.history.entity for f in fitted.spec.features if f.history is not None})
    if name not in keyed:
        raise InvalidStoreArgumentError(f"--entity {name}=...: feature spec {fitted.spec.name!r} keeps history by "
                                        f"{keyed or 'nothing'}; write --entity {keyed[0] if keyed else 'card_id'}=VALUE")


def parse_time_us(text: str) -> int:
    """An ISO 8601 time (naive: UTC) in epoch microseconds."""
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidStoreArgumentError(f"--at {text!r} is not an ISO 8601 time, e.g. 2026-03-01T12:00:00") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return (parsed - _EPOCH) // dt.timedelta(microseconds=1)


def show(url: str, fitted: FittedFeatures, value: str, at_us: int | None = None,
         values: Mapping[str, float] | None = None, client: redis.Redis | None = None) -> EntityState:
    """The state of entity `value` (e.g. card_id "123") and the features of a transaction at `at_us`
    (default now) with `values` (default NaN: ratios come out NaN). Changes nothing in the store."""
    owned = client is None
    client = client or redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    history = online_history(fitted, client, url)
    at = int(time.time() * 1e6) if at_us is None else int(at_us)
    try:
        unknown = sorted(set(values or {}) - set(history.value_columns))
        if unknown:
            raise InvalidStoreArgumentError(f"--value {unknown[0]}=...: the history features of feature spec "
                                            f"{fitted.spec.name!r} read no {unknown[0]!r}; they read "
                                            f"{history.value_columns or 'no value'}: write --value NAME=X with one of them")
        given = {c: float((values or {}).get(c, math.nan)) for c in history.value_columns}
        z, _, h = history.keys(value)
        pipe = client.pipeline(transaction=False)
        pipe.zrange(z, 0, -1)
        pipe.hgetall(h)
        raw_members, records = pipe.execute()
        got = history.features(np.array([value]), np.array([at]), {c: np.array([v]) for c, v in given.items()},
                               np.array([PROBE_ID]), update=False)[0]
    except (redis.ConnectionError, redis.TimeoutError, StoreUnavailable) as exc:
        raise StoreUnavailableError(url, exc) from exc
    finally:
        history.close()
        if owned:
            client.close()
    txn_of = {m: k[2:].decode(errors="replace") for k, m in records.items() if k.startswith(b"t:")}
    members = []
    for raw in raw_members:
        t, vals, seq = decode_member(raw)
        members.append((t, txn_of.get(raw, "?"), seq, dict(zip(history.value_columns, vals))))
    return EntityState(history.entity, value, int(records.get(b"seq", 0)), members, at, given,
                       dict(zip(history.names, got.tolist())), redacted(url))


def _iso(t_us: int) -> str:
    return (_EPOCH + dt.timedelta(microseconds=t_us)).isoformat().replace("+00:00", "Z")
