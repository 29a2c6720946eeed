"""Sequential latency of treeops' own store (backends.online_history) next to a bare Redis PING, same process.

Run with the project venv. Seeds `--cards` cards with `--history` transactions each over the last 30 days
(the fraud spec's history features, FRAUD_FEATURES), then times one transaction per call:
OnlineHistory.features (one atomic Lua call: read the window + insert + idempotency record) and the read-only
variant. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import redis

from backends.online_history import OnlineHistory, connect
from training.features import FRAUD_FEATURES, FittedFeatures

DAY_US = 86_400 * 1_000_000


def timed(label: str, calls: int, warmup: int, fn) -> dict:
    """Run fn(i) warmup + calls times, one at a time; percentiles of the timed calls in microseconds."""
    for i in range(warmup):
        fn(i)
    samples = np.empty(calls, dtype=np.float64)
    for i in range(calls):
        start = time.perf_counter_ns()
        fn(warmup + i)
        samples[i] = (time.perf_counter_ns() - start) / 1e3
    return {"what": label, "calls": calls, "p50_us": round(float(np.percentile(samples, 50)), 1),
            "p99_us": round(float(np.percentile(samples, 99)), 1), "mean_us": round(float(samples.mean()), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--namespace", default="bench:card_transactions_v2:card_id")
    parser.add_argument("--cards", type=int, default=5_000)
    parser.add_argument("--history", type=int, default=10, help="seeded transactions per card")
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()

    url = f"redis://localhost:{args.port}/0"
    client = connect(url)
    client.delete(*client.keys(args.namespace + ":*") or ["-"])
    features = FittedFeatures(FRAUD_FEATURES, {}).to_dict()["features"]
    store = OnlineHistory(client, url, args.namespace, features, late_us=FRAUD_FEATURES.late_arrival_us)
    rng = np.random.default_rng(0)
    now_us = time.time_ns() // 1_000

    seeded = args.cards * args.history
    cards = np.repeat(np.arange(args.cards, dtype=np.int64), args.history)
    times = now_us - rng.integers(DAY_US // 24, 30 * DAY_US, seeded)
    amounts = rng.gamma(2.0, 50.0, seeded)
    started = time.perf_counter()
    for lo in range(0, seeded, 2_000):
        sl = slice(lo, lo + 2_000)
        store.features(cards[sl], times[sl], {"amount": amounts[sl]}, np.arange(lo, lo + 2_000)[: len(cards[sl])])
    seed_s = time.perf_counter() - started

    picks = rng.integers(0, args.cards, args.calls + args.warmup)
    amount = {"amount": np.array([42.0])}

    def one(i: int, update: bool, offset: int) -> np.ndarray:
        return store.features(picks[i : i + 1], np.array([now_us + offset + i * 1_000]), amount,
                              np.array([seeded + offset + i]), update=update)

    results = [
        timed("redis PING (redis-py)", args.calls, args.warmup, lambda i: client.ping()),
        timed("ours features(update=True): read window + insert, one atomic Lua call", args.calls, args.warmup,
              lambda i: one(i, True, 10_000)),
        timed("ours features(update=False): read window only", args.calls, args.warmup,
              lambda i: one(i, False, 20_000)),
    ]
    first, retry = one(0, True, 50_000), one(0, True, 50_000)  # a retried transaction id: the same answer
    np.testing.assert_array_equal(first, retry)
    print(json.dumps({"redis_py": redis.__version__, "python": platform.python_version(),
                      "history_features": store.names, "seeded_rows": int(seeded), "seed_s": round(seed_s, 2),
                      "cards": args.cards, "results": results}, indent=1))


if __name__ == "__main__":
    main()
