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

One `features` call is one Lua script call (EVALSHA, loaded again on NOSCRIPT) for all its rows, of every entity
(a call of more than SCRIPT_ROWS rows is split into several, sent in the same round trip). The script takes the
rows in (time_us, row index) order, so rows of one entity each see the ones before them, and per row: a
transaction id already recorded returns the history as it was at its first arrival (members with a smaller seq
inside its window) and changes nothing; otherwise it reads the members in [t - longest window, t) and, when that
row updates, inserts the transaction, records its id and prunes. Its reply is two strings of float64 (each row's
own member and window size; every window's members), from which numpy computes every row's aggregates at once.

Redis runs a script atomically as a whole: no other client's command runs while one call applies its rows, so a
call of many rows is as consistent as one of one row (and holds Redis for longer: hence SCRIPT_ROWS). On Redis
Cluster a script's keys must all be in one hash slot (else CROSSSLOT). The `{v}` hash tag puts one entity's three
keys in one slot, but a call covering several entities spans several slots: the choice here is one round trip per
call to one Redis (standalone, or a primary with replicas; `connect` makes a plain client). A Cluster deployment
would group a call's rows by `CLUSTER KEYSLOT` of their entity and send one script per slot to the node owning it
(each still atomic per entity, which is all the semantics need); a namespace-wide hash tag instead would put every
entity on one node, which defeats the cluster.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import operator
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

#: Rows one script call applies at most: a longer call is split into several, sent in the same round trip, so no
#: script holds Redis (which runs nothing else meanwhile) for more than this many rows.
SCRIPT_ROWS = 512

# KEYS: per entity of the call its members zset, transaction-id zset and hash. ARGV: longest window us, retention
# us, data (per row time_us and values, little-endian float64), update flags (one byte per row, "1"/"0"), then per
# row its entity's number (1-based, in KEYS order) and transaction id; rows in the order they apply.
# Returns {heads, windows}: per row seen (0/1), its member (data + seq; seq 0 when not stored) and the number of
# its window's members, as float64; then every row's members in [t - longest window, t), oldest first, row after
# row. For a seen id: its first arrival's member and window, which the caller filters to seq < its seq.
# Each row reads its entity's whole members zset (it holds the retention: the longest window plus the allowance) and
# finds its window, the newest and the oldest time in it: pruning runs only when something is older than the
# retention, so an insert costs six commands.
SCRIPT = """
local maxw, keep, data, flags = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local width = #data / #flags
local function first_at(all, t)  -- first member of all (sorted by time) with time >= t, else #all + 1
  local lo, hi = 1, #all + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if struct.unpack('<d', all[mid]) < t then lo = mid + 1 else hi = mid end
  end
  return lo
end
local heads, windows, w = {}, {}, 0
for i = 1, #flags do
  local e, txn = 3 * tonumber(ARGV[3 + 2 * i]), ARGV[4 + 2 * i]
  local z, tz, h = KEYS[e - 2], KEYS[e - 1], KEYS[e]
  local d = string.sub(data, (i - 1) * width + 1, i * width)
  local own = redis.call('HGET', h, 't:' .. txn)
  local seen = own and 1 or 0
  local t = struct.unpack('<d', own or d)
  local all = redis.call('ZRANGE', z, 0, -1)
  local from, to = first_at(all, t - maxw), first_at(all, t) - 1
  if not own then
    if string.byte(flags, i) == 49 then
      local ts = string.format('%.0f', t)
      own = d .. struct.pack('<d', redis.call('HINCRBY', h, 'seq', 1))
      redis.call('ZADD', z, ts, own)
      redis.call('ZADD', tz, ts, txn)
      redis.call('HSET', h, 't:' .. txn, own)
      local newest, oldest = t, t
      if #all > 0 then
        newest, oldest = math.max(t, (struct.unpack('<d', all[#all]))), math.min(t, (struct.unpack('<d', all[1])))
      end
      if oldest < newest - keep then
        local cutoff = '(' .. string.format('%.0f', newest - keep)
        local old = redis.call('ZRANGEBYSCORE', tz, '-inf', cutoff)
        for j = 1, #old do
          redis.call('HDEL', h, 't:' .. old[j])
        end
        redis.call('ZREMRANGEBYSCORE', tz, '-inf', cutoff)
        redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
      end
    else
      own = d .. struct.pack('<d', 0)
    end
  end
  heads[i] = struct.pack('<d', seen) .. own .. struct.pack('<d', to - from + 1)
  for j = from, to do
    w = w + 1
    windows[w] = all[j]
  end
end
return {table.concat(heads), table.concat(windows)}
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


def value_columns(features: Sequence[Mapping]) -> list[str]:
    """The value columns a member stores, in member order (first use first), of `features` as OnlineHistory
    takes them; treeops' C backend reads this order from the version's online.json (export/native_online.py)."""
    return list(dict.fromkeys(f["history"]["value"] for f in features if f.get("history") and f["history"].get("value")))


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
        self.value_columns: list[str] = value_columns(features)
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
                 transaction_id: np.ndarray, update: bool | np.ndarray = True) -> np.ndarray:
        """History features, float64 [rows, len(names)], of transactions given as columns (`values` holds
        `value_columns`). Rows of one entity apply in (time_us, row index) order, each seeing the ones
        before it; a transaction id already seen returns its first answer and changes nothing; rows whose
        `update` (one bool, or one per row) is False only read. One round trip, one script call per
        SCRIPT_ROWS rows. Raises StoreUnavailable when Redis does not answer."""
        times = np.asarray(time_us, dtype=np.int64).reshape(-1)
        rows = times.shape[0]
        if rows == 0:
            return np.empty((0, len(self._plan)), dtype=np.float64)
        order = np.argsort(times, kind="stable") if rows > 1 else np.zeros(1, dtype=np.intp)
        entities = np.asarray(entity).reshape(-1)[order].tolist()
        txns = np.asarray(transaction_id).reshape(-1)[order].tolist()
        data = self.data(times[order], {c: np.asarray(values[c]).reshape(-1)[order] for c in self.value_columns})
        updates = np.broadcast_to(np.asarray(update, dtype=bool).reshape(-1), (rows,))[order]
        flags = np.where(updates, ord("1"), ord("0")).astype(np.uint8).tobytes()
        calls = []
        for a in range(0, rows, SCRIPT_ROWS):
            b = min(a + SCRIPT_ROWS, rows)
            numbers: dict = {}  # entity -> its keys' place in KEYS (1-based, in triples)
            per_row: list = []
            for e, txn in zip(entities[a:b], txns[a:b]):
                per_row += (numbers.setdefault(e, len(numbers) + 1), txn)
            keys = [k for e in numbers for k in self.keys(e)]
            calls.append((len(keys), *keys, *self._args, data[a:b].tobytes(), flags[a:b], *per_row))
        replies = self._run(calls)
        heads = np.frombuffer(b"".join(r[0] for r in replies), dtype="<f8").tolist()
        members = np.frombuffer(b"".join(r[1] for r in replies), dtype="<f8").tolist()
        out = np.empty((rows, len(self._plan)), dtype=np.float64)
        out[order] = self._aggregate(heads, members)
        return out

    def _run(self, calls: list[tuple]) -> list:
        """All calls in one pipelined round trip; loads the script and repeats once on NOSCRIPT (safe: a
        repeated transaction id changes nothing)."""
        for attempt in (0, 1):
            replies = self._send([("EVALSHA", _SHA, *call) for call in calls])
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

    def _aggregate(self, heads: list[float], members: list[float]) -> list[list[float]]:
        """Every row's features from the script's replies as float lists: `heads` (per row seen, its member, its
        window's size) and `members` (every row's window, row after row, oldest first). Plain floats, row by row:
        for windows of tens of members that is cheaper than numpy's per-call cost."""
        width = self._width + 1  # floats per member: time_us, values, seq
        step = width + 2
        out, at = [], 0
        for head in range(0, len(heads), step):
            seen, own, n = heads[head], heads[head + 1:head + 1 + width], int(heads[head + step - 1])
            block = members[at:at + n * width]
            at += n * width
            columns = [block[c::width] for c in range(width)]
            if seen:  # a retry: its history as at its first arrival (members stored before it)
                kept = [j for j, seq in enumerate(columns[-1]) if seq < own[-1]]
                columns = [[c[j] for j in kept] for c in columns]
                n = len(kept)
            out.append(self._row(own, columns, n))
        return out

    def _row(self, own: list[float], columns: list[list[float]], n: int) -> list[float]:
        """One row's features: `own` its member, `columns` its window's members by column (time first, sorted)."""
        t, times = own[0], columns[0]
        row: list[float] = []
        starts: dict[int, int] = {}
        sums: dict[tuple[int, int], float] = {}
        for agg, window, col in self._plan:
            start = starts.get(window)
            if start is None:
                start = starts[window] = bisect.bisect_left(times, t - window)
            count = n - start
            if agg == 0:
                row.append(float(count))
            elif agg == 3:
                row.append((t - times[-1]) / 1e6 if count else math.nan)
            else:
                total = sums.get((start, col))
                if total is None:
                    total = sums[start, col] = _sum(times[start:], columns[col][start:]) if count else 0.0
                if agg == 1:
                    row.append(total)
                elif agg == 2:
                    row.append(total / count if count else math.nan)
                else:
                    mean = total / count if count else 0.0
                    row.append(own[col] / mean if mean != 0.0 else math.nan)
        return row


def _sum(times: list[float], values: list[float]) -> float:
    """The values added left to right in (time, value) order: the one float64 the offline rule gives
    (training.history) whatever the arrival order. `times` is sorted; only ties need the values sorted."""
    if len(set(times)) < len(times):
        values = [v for _, v in sorted(zip(times, values))]
    return functools.reduce(operator.add, values)


_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
