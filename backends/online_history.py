"""Per-entity transaction history in Redis: the online side of the spec's history features.

Copied beside `model.py` into raw-transaction version folders and run inside Triton's stub, so it
imports only numpy and redis.

Semantics (the same as training/history.py offline): for transaction i of entity e at time t, its
history H(i) is e's transactions j that arrived before i and have t - window <= t_j < t (a strictly
earlier timestamp: equal timestamps never see each other). Aggregates over H(i), float64:
count |H| (0 when empty); sum of value_j added left to right in (t_j, value_j) order (0.0 when empty);
mean sum/count (NaN when empty);
seconds_since_prev (t - max t_j) / 1e6 (NaN when empty); ratio_to_mean value_i / mean (NaN when
empty or mean == 0). A late arrival never changes a score already given: it only joins the history
of transactions arriving after it.

Redis layout, per entity value v under namespace ns (`namespace_for`); the `{v}` hash tag keeps an
entity's keys in one Redis Cluster slot:
- `ns:{v}:z` sorted set scored by time_us; each member is fixed-width binary: time_us, the value columns
  (`value_columns`) and the arrival seq, as little-endian float64 (exact: values round-trip bit for bit,
  times and seqs are integers below 2**53). Fixed width lets the script return a window unparsed.
- `ns:{v}:h` hash: field `seq` the arrival counter (HINCRBY), and per transaction id `t:<id>` -> its
  member, the idempotency record.
- `ns:{v}:t` sorted set of transaction ids scored by time_us, to find the records to prune.
- pruning: each insert drops members and records older than the entity's newest time minus the longest
  window minus `late_us`, the spec's late allowance (FeatureSpec.late_arrival, stored with the fitted
  features as "late_arrival_us"; `late_us_of`): a transaction arriving up to `late_us` behind its entity's
  newest one still gets its exact history, and a retry of it within that time its first answer; one
  arriving later sees only the kept part of its window (the rule's allowance clause, training/history.py).

Each (row, entity) is one Lua script call (EVALSHA, loaded again on NOSCRIPT), atomic in Redis: a
transaction id already recorded returns the history as it was at its first arrival (members with a
smaller seq inside its window) and changes nothing; otherwise it reads the members in
[t - longest window, t) and, when updating, inserts the transaction, records its id and prunes. All rows
of a call go in one pipelined round trip, in (time_us, row index) order, so rows of one entity each see
the ones before them. Python computes the aggregates from the returned members.
"""

from __future__ import annotations

import hashlib
import math
import threading
import urllib.parse
from collections.abc import Mapping, Sequence

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

AGGREGATES = ("count", "sum", "mean", "seconds_since_prev", "ratio_to_mean")
#: Key of the late allowance (microseconds) in the fitted features' JSON (FittedFeatures.to_dict).
LATE_ARRIVAL_KEY = "late_arrival_us"
#: The late allowance of fitted features whose JSON predates LATE_ARRIVAL_KEY: the 1 day those versions were
#: exported and served with. FeatureSpec's default allowance is this value (training/features.py).
UNDECLARED_LATE_US = 86_400 * 1_000_000

# KEYS: members zset, transaction-id zset, hash. ARGV: time_us (decimal), longest window us, retention us,
# transaction id, data (time_us and values as little-endian float64), update (1/0).
# Returns {seen (0/1), this transaction's member (data + seq; seq 0 when not stored), the members in
# [t - longest window, t) oldest first}: for a seen id its first arrival's member and window, which the
# caller filters to seq < its seq.
SCRIPT = """
local z, tz, h = KEYS[1], KEYS[2], KEYS[3]
local t, txn = ARGV[1], ARGV[4]
local own = redis.call('HGET', h, 't:' .. txn)
local seen = own and 1 or 0
if own then
  t = string.format('%.0f', struct.unpack('<d', own))
end
local rows = redis.call('ZRANGEBYSCORE', z, string.format('%.0f', tonumber(t) - tonumber(ARGV[2])), '(' .. t)
if own then
  return {seen, own, rows}
end
if ARGV[6] ~= '1' then
  return {seen, ARGV[5] .. struct.pack('<d', 0), rows}
end
own = ARGV[5] .. struct.pack('<d', redis.call('HINCRBY', h, 'seq', 1))
redis.call('ZADD', z, t, own)
redis.call('ZADD', tz, t, txn)
redis.call('HSET', h, 't:' .. txn, own)
local newest = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')[2]
local cutoff = '(' .. string.format('%.0f', tonumber(newest) - tonumber(ARGV[3]))
local old = redis.call('ZRANGEBYSCORE', tz, '-inf', cutoff)
if #old > 0 then
  for i = 1, #old do
    redis.call('HDEL', h, 't:' .. old[i])
  end
  redis.call('ZREMRANGEBYSCORE', tz, '-inf', cutoff)
  redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
end
return {seen, own, rows}
"""


class StoreUnavailable(Exception):
    """The online store did not answer (connection refused, reset or timed out); the message names its URL."""


def late_us_of(fitted: Mapping) -> int:
    """The late allowance in microseconds stored with fitted features (`FittedFeatures.to_dict()` output);
    UNDECLARED_LATE_US for JSON written before it was stored (OnlineHistory checks the value)."""
    return fitted.get(LATE_ARRIVAL_KEY, UNDECLARED_LATE_US)


def redacted(url: str) -> str:
    """`url` without its password (user kept, password as ***), for every message, log and result."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def namespace_for(spec_name: str, entity: str) -> str:
    """Key prefix of one spec's history of one entity column: `treeops:<spec>:<entity>`."""
    return f"treeops:{spec_name}:{entity}"


def connect(url: str, timeout_s: float = 1.0, retries: int = 1) -> redis.Redis:
    """A client for `url` that fails fast: `timeout_s` to connect and per reply, `retries` immediate
    reconnects on a dropped connection (a restarted Redis), none on a timeout. Retrying is safe: a
    transaction id already recorded changes nothing."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), retries), retry_on_error=[redis.ConnectionError])


def entity_token(value: object) -> bytes:
    """An entity value as it appears in its keys: bytes as they are, str UTF-8, anything else str()."""
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else str(value)).encode()


def decode_member(raw: bytes) -> tuple[int, list[float], int]:
    """(time_us, values, seq) of a sorted-set member: little-endian float64 time_us, values..., seq."""
    head = np.frombuffer(raw, dtype="<f8")
    return int(head[0]), head[1:-1].tolist(), int(head[-1])


class OnlineHistory:
    """The history features of one entity, read and updated in Redis (see the module docstring).

    `features`: FittedFeatures.to_dict()["features"] entries; those with a "history" declaration
    ({"aggregate","window","window_us","entity","time","value"}) are used, in order. They must share
    one entity and time column. `client` must return bytes (decode_responses=False, as from `connect`).
    `late_us`: the spec's late allowance (`late_us_of`); `url` appears in messages only without its password.
    """

    def __init__(self, client: redis.Redis, url: str, namespace: str, features: Sequence[Mapping], *,
                 late_us: int):
        history = [(f["name"], f["history"]) for f in features if f.get("history")]
        if not history:
            raise ValueError("no feature has a \"history\" declaration: OnlineHistory needs at least one")
        entities = sorted({h["entity"] for _, h in history})
        times = sorted({h["time"] for _, h in history})
        if len(entities) > 1 or len(times) > 1:
            raise ValueError(f"history features of entities {entities} and time columns {times}: build one "
                             "OnlineHistory per entity, each with that entity's features")
        for name, h in history:
            if h["aggregate"] not in AGGREGATES:
                raise ValueError(f"feature {name!r}: unknown aggregate {h['aggregate']!r}, expected one of "
                                 f"{', '.join(AGGREGATES)}")
            if h["aggregate"] in ("sum", "mean", "ratio_to_mean") and not h.get("value"):
                raise ValueError(f"feature {name!r}: aggregate {h['aggregate']!r} needs a \"value\" column")
        if isinstance(late_us, bool) or not isinstance(late_us, int) or late_us < 0:
            raise ValueError(f"{namespace}: late allowance {late_us!r} is not an integer number of microseconds >= 0; "
                             f"declare it on the feature spec (late_arrival) and re-export")
        self.client, self.url, self.namespace = client, redacted(url), namespace
        self.entity, self.time = entities[0], times[0]
        self.names: list[str] = [name for name, _ in history]
        #: The value columns stored with every transaction, in member order.
        self.value_columns: list[str] = list(dict.fromkeys(h["value"] for _, h in history if h.get("value")))
        self.max_window_us = max(int(h["window_us"]) for _, h in history)
        self.late_us = late_us
        self.retention_us = self.max_window_us + late_us
        # Per feature: (aggregate index, window us, column of the member data: 1 + value index, or 0).
        self._plan = [(AGGREGATES.index(h["aggregate"]), int(h["window_us"]),
                       1 + self.value_columns.index(h["value"]) if h.get("value") else 0) for _, h in history]
        self._width = 1 + len(self.value_columns)
        self._prefix = namespace.encode() + b":{"
        self._args = (str(self.max_window_us), str(self.retention_us))
        # A connection of its own, made with the client's settings and opened on first use: no pool bookkeeping
        # per call. The lock makes the object usable from several threads (their calls then take turns).
        self._conn = client.connection_pool.make_connection()
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close this object's connection (the next call opens it again)."""
        self._conn.disconnect()

    def keys(self, entity: object) -> tuple[bytes, bytes, bytes]:
        """The members zset, transaction-id zset and hash of one entity value."""
        base = self._prefix + entity_token(entity) + b"}:"
        return base + b"z", base + b"t", base + b"h"

    def data(self, time_us: np.ndarray, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """Member data of each row: [rows, 1 + value columns] little-endian float64 (time_us, values)."""
        times = np.asarray(time_us).reshape(-1)
        out = np.empty((times.shape[0], self._width), dtype="<f8")
        out[:, 0] = times
        for k, c in enumerate(self.value_columns, start=1):
            out[:, k] = np.asarray(values[c], dtype=np.float64).reshape(-1)
        return out

    def features(self, entity: np.ndarray, time_us: np.ndarray, values: Mapping[str, np.ndarray],
                 transaction_id: np.ndarray, update: bool = True) -> np.ndarray:
        """History features, float64 [rows, len(names)], of transactions given as columns (`values` holds
        `value_columns`). Rows of one entity apply in (time_us, row index) order, each seeing the ones
        before it; a transaction id already seen returns its first answer and changes nothing;
        update=False only reads. Raises StoreUnavailable when Redis does not answer."""
        times = np.asarray(time_us, dtype=np.int64).reshape(-1)
        rows = times.shape[0]
        entities = np.asarray(entity).reshape(-1).tolist()
        txns = np.asarray(transaction_id).reshape(-1).tolist()
        data = self.data(times, values)
        order = np.argsort(times, kind="stable").tolist() if rows > 1 else [0]
        flag = b"1" if update else b"0"
        maxw, keep = self._args
        calls = []
        for i in order:
            calls.append((*self.keys(entities[i]), int(times[i]), maxw, keep, txns[i], data[i].tobytes(), flag))
        replies = self._run(calls)
        out = np.empty((rows, len(self._plan)), dtype=np.float64)
        for i, reply in zip(order, replies):
            out[i] = self._aggregate(reply)
        return out

    def _run(self, calls: list[tuple]) -> list:
        """All calls in one pipelined round trip; loads the script and repeats once on NOSCRIPT (safe: a
        repeated transaction id changes nothing)."""
        for attempt in (0, 1):
            replies = self._send([("EVALSHA", _SHA, 3, *call) for call in calls])
            errors = [r for r in replies if isinstance(r, Exception)]
            if not errors:
                return replies
            if attempt == 0 and any(isinstance(e, redis.exceptions.NoScriptError) for e in errors):
                self._send([("SCRIPT", "LOAD", SCRIPT)])
                continue
            raise errors[0]
        raise AssertionError("unreachable")

    def _send(self, commands: list[tuple]) -> list:
        """Write all commands at once on this object's own connection and read every reply (errors as
        values). A dropped connection is reopened and the batch sent once more; a timeout or a second
        failure raises StoreUnavailable."""
        with self._lock:
            for attempt in (0, 1):
                conn = self._conn
                try:
                    conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                    replies = []
                    for _ in commands:
                        try:
                            replies.append(conn.read_response())
                        except redis.ResponseError as exc:
                            replies.append(exc)
                    return replies
                except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    conn.disconnect()
                    if attempt == 0 and isinstance(exc, redis.ConnectionError):
                        continue
                    raise StoreUnavailable(f"online store {self.url} is unavailable ({type(exc).__name__}: {exc}): "
                                           "start Redis there or set TREEOPS_ONLINE_STORE_URL to a running one"
                                           ) from exc
        raise AssertionError("unreachable")

    def _aggregate(self, reply: list) -> np.ndarray:
        """One row's features from the script's reply: its own data and its history's."""
        own = np.frombuffer(reply[1], dtype="<f8")
        members = np.frombuffer(b"".join(reply[2]), dtype="<f8").reshape(-1, self._width + 1)
        if reply[0]:  # a retry: its history as at its first arrival
            members = members[members[:, -1] < own[-1]]
        t = own[0]
        member_t = members[:, 0]
        n = member_t.shape[0]
        row = np.empty(len(self._plan), dtype=np.float64)
        starts: dict[int, int] = {}
        for k, (agg, window, col) in enumerate(self._plan):
            start = starts.get(window)
            if start is None:
                start = starts[window] = int(member_t.searchsorted(t - window)) if n else 0
            count = n - start
            if agg == 0:
                row[k] = count
            elif agg == 3:
                row[k] = (t - member_t[-1]) / 1e6 if count else math.nan
            else:
                total = _sum(member_t[start:], members[start:, col]) if count else 0.0
                if agg == 1:
                    row[k] = total
                elif agg == 2:
                    row[k] = total / count if count else math.nan
                else:
                    mean = total / count if count else 0.0
                    row[k] = own[col] / mean if mean != 0.0 else math.nan
        return row


def _sum(times: np.ndarray, values: np.ndarray) -> float:
    """The values added left to right in (time, value) order: the one float64 the offline rule gives
    (training.history) whatever the arrival order. `times` is sorted; only ties need the values sorted."""
    if times.shape[0] > 1 and (times[1:] == times[:-1]).any():
        values = values[np.lexsort((values, times))]
    return float(np.add.accumulate(values)[-1])


_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
