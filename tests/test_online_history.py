"""OnlineHistory against a real redis-server: window edges, ties, batches, retries, read-only, concurrency."""

from __future__ import annotations

import math
import multiprocessing
import threading
import time

import numpy as np
import pytest
import redis

from backends.online_history import OnlineHistory, StoreUnavailable, connect, decode_member, namespace_for
from online_store.redis_server import LocalRedis, free_port

pytest_plugins = ("redis_fixtures",)

H = 3_600 * 1_000_000
DAY = 24 * H


def _history(aggregate: str, window: str, window_us: int, value: str | None = None) -> dict:
    return {"aggregate": aggregate, "window": window, "window_us": window_us, "entity": "card_id",
            "time": "timestamp", "value": value}


#: The fraud spec's history features as FittedFeatures.to_dict() lists them (with a stateless one first).
FEATURES = [
    {"name": "log_amount", "history": None},
    {"name": "card_txn_count_1h", "history": _history("count", "1h", H)},
    {"name": "card_txn_count_24h", "history": _history("count", "24h", DAY)},
    {"name": "card_amount_sum_24h", "history": _history("sum", "24h", DAY, "amount")},
    {"name": "card_amount_mean_24h", "history": _history("mean", "24h", DAY, "amount")},
    {"name": "seconds_since_prev_card_txn", "history": _history("seconds_since_prev", "30d", 30 * DAY)},
    {"name": "amount_to_card_mean_30d", "history": _history("ratio_to_mean", "30d", 30 * DAY, "amount")},
]
T0 = 1_767_225_600_000_000  # 2026-01-01 UTC in microseconds


def _online(client: redis.Redis, url: str = "redis://test") -> OnlineHistory:
    return OnlineHistory(client, url, namespace_for("card_transactions_v2", "card_id"), FEATURES, late_us=DAY)


def _score(h: OnlineHistory, rows: list[tuple], update: bool = True) -> np.ndarray:
    """rows: (card, time_us, amount, transaction_id)."""
    card, t, amount, txn = (np.array(c) for c in zip(*rows))
    return h.features(card, t, {"amount": amount}, txn, update=update)


def _state(client: redis.Redis) -> dict:
    """Every key's content, to compare before and after."""
    out = {}
    for key in client.keys("*"):
        kind = client.type(key)
        out[key] = client.zrange(key, 0, -1, withscores=True) if kind == b"zset" else client.hgetall(key)
    return out


def test_names_are_the_history_features_in_spec_order(store: redis.Redis) -> None:
    h = _online(store)
    assert h.names == [f["name"] for f in FEATURES[1:]]
    assert h.value_columns == ["amount"]


def test_window_edges_and_equal_timestamps(store: redis.Redis) -> None:
    h = _online(store)
    rows = [(7, T0, 10.0, 1), (7, T0 + H, 20.0, 2), (7, T0 + H, 40.0, 3), (7, T0 + 2 * H, 30.0, 4)]
    got = _score(h, rows)
    nan = math.nan
    want = [
        [0, 0, 0.0, nan, nan, nan],
        # T0 is exactly 1 h earlier: inside the 1 h window (t - window <= t_j)
        [1, 1, 10.0, 10.0, 3600.0, 2.0],
        # the same timestamp as txn 2: they never see each other
        [1, 1, 10.0, 10.0, 3600.0, 4.0],
        # T0 is 2 h earlier: out of 1 h, inside 24 h; txns 2 and 3 at exactly 1 h are inside
        [2, 3, 70.0, 70.0 / 3, 3600.0, 30.0 / (70.0 / 3)],
    ]
    np.testing.assert_array_equal(got, np.array(want))


def test_rows_of_one_card_apply_in_time_order_within_a_call(store: redis.Redis) -> None:
    h = _online(store)
    # given out of order, and two cards interleaved
    got = _score(h, [(1, T0 + 2 * H, 5.0, 12), (2, T0, 1.0, 20), (1, T0, 5.0, 10), (1, T0 + H, 5.0, 11)])
    assert got[:, 1].tolist() == [2, 0, 0, 1]  # 24 h counts: each row sees the card's earlier rows


def test_ratio_to_mean_is_nan_when_the_mean_is_zero(store: redis.Redis) -> None:
    h = _online(store)
    got = _score(h, [(1, T0, 0.0, 1), (1, T0 + 1, 5.0, 2)])
    assert math.isnan(got[1, 5]) and got[1, 3] == 0.0


def test_values_round_trip_exactly(store: redis.Redis) -> None:
    h = _online(store)
    amounts = [0.1, 1 / 3, 1e-300, 123456789.12345678]
    got = _score(h, [(1, T0 + i, a, i) for i, a in enumerate(amounts)] + [(1, T0 + 99, 1.0, 99)])
    assert got[-1, 2] == float(np.sum(np.array(amounts)))
    assert got[1, 2] == 0.1 and got[2, 3] == (0.1 + 1 / 3) / 2


def test_a_retried_transaction_gets_its_first_answer_and_changes_nothing(store: redis.Redis) -> None:
    h = _online(store)
    first = _score(h, [(1, T0, 10.0, 1), (1, T0 + 60_000_000, 30.0, 2)])
    _score(h, [(1, T0 + 120_000_000, 50.0, 3)])  # arrives after txn 2 was scored
    before = _state(store)
    again = _score(h, [(1, T0 + 60_000_000, 30.0, 2)])
    np.testing.assert_array_equal(again, first[1:])
    # the same id with other fields (a buggy client) still answers as the first time
    np.testing.assert_array_equal(_score(h, [(1, T0 + 999, 1.0, 2)]), first[1:])
    assert _state(store) == before


def test_a_transaction_twice_in_one_request_is_counted_once(store: redis.Redis) -> None:
    h = _online(store)
    got = _score(h, [(1, T0, 10.0, 1), (1, T0, 10.0, 1), (1, T0 + 5, 3.0, 2)])
    np.testing.assert_array_equal(got[0], got[1])
    assert got[2, 1] == 1


def test_read_only_reads_and_changes_nothing(store: redis.Redis) -> None:
    h = _online(store)
    _score(h, [(1, T0, 10.0, 1)])
    before = _state(store)
    peek = _score(h, [(1, T0 + 5, 20.0, 2)], update=False)
    assert _state(store) == before
    np.testing.assert_array_equal(peek, _score(h, [(1, T0 + 5, 20.0, 2)]))


def test_old_members_and_their_records_are_pruned(store: redis.Redis) -> None:
    h = OnlineHistory(store, "redis://test", "ns", FEATURES, late_us=H)
    _score(h, [(1, T0, 1.0, 1), (1, T0 + 10 * DAY, 1.0, 2)])
    _score(h, [(1, T0 + 30 * DAY + H + 1, 1.0, 3)])  # txn 1 is now older than 30 d + 1 h
    z, tz, hk = h.keys(1)
    assert [decode_member(m)[2] for m in store.zrange(z, 0, -1)] == [2, 3]
    assert store.zrange(tz, 0, -1) == [b"2", b"3"]
    assert sorted(store.hkeys(hk)) == [b"seq", b"t:2", b"t:3"]
    assert store.hget(hk, "seq") == b"3"


def test_a_flushed_script_cache_is_reloaded(store: redis.Redis) -> None:
    h = _online(store)
    _score(h, [(1, T0, 1.0, 1)])
    store.script_flush()
    assert _score(h, [(1, T0 + 1, 1.0, 2)])[0, 0] == 1


def _hammer(url: str, worker: int, n: int, out: dict | None = None) -> dict[int, float]:
    """n transactions of card 5 from one client, one per call; returns their 24 h counts by id."""
    client = connect(url)
    h = _online(client, url)
    counts = {}
    for i in range(n):
        txn, t = worker * 1_000_000 + i, T0 + (i * 7 + worker) % 50  # many equal timestamps across workers
        counts[txn] = float(_score(h, [(5, t, 1.0, txn)])[0, 1])
    h.close()
    if out is not None:
        out.update(counts)
    return counts


def test_concurrent_clients_on_one_card_lose_nothing(store: redis.Redis, redis_server: LocalRedis) -> None:
    """4 threads and 3 processes send 700 transactions of one card at once: every one is stored with its own
    arrival number, and each answer is exactly the history of the ones stored before it (read and insert
    were one step): a retry, rebuilt from the stored arrival numbers, gives the same count."""
    answers: dict[int, float] = {}
    threads = [threading.Thread(target=_hammer, args=(redis_server.url, w, 100, answers)) for w in range(4)]
    for t in threads:
        t.start()
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        for counts in pool.starmap(_hammer, [(redis_server.url, 4 + w, 100) for w in range(3)]):
            answers.update(counts)
    for t in threads:
        t.join()
    h = _online(store)
    z, _, hk = h.keys(5)
    seqs = sorted(decode_member(m)[2] for m in store.zrange(z, 0, -1))
    assert seqs == list(range(1, 701)) and store.hget(hk, "seq") == b"700"
    retried = {txn: float(_score(h, [(5, 0, 0.0, txn)])[0, 1]) for txn in answers}
    assert len(answers) == 700 and retried == answers


def test_store_down_raises_store_unavailable_naming_the_url() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    h = _online(connect(url, timeout_s=0.5), url)
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match=url.replace("/", ".")):
        _score(h, [(1, T0, 1.0, 1)])
    assert time.monotonic() - start < 3


def test_a_feature_list_without_history_is_refused(store: redis.Redis) -> None:
    with pytest.raises(ValueError, match="history"):
        OnlineHistory(store, "redis://x", "ns", [{"name": "a", "history": None}], late_us=DAY)


@pytest.mark.parametrize("late_us", [-1, 1.5, True])
def test_a_bad_late_allowance_is_refused_naming_the_namespace(store: redis.Redis, late_us: object) -> None:
    with pytest.raises(ValueError, match="ns: late allowance .* microseconds >= 0"):
        OnlineHistory(store, "redis://x", "ns", FEATURES, late_us=late_us)
