"""Sequential latency of Feast's Redis online store, next to a bare Redis PING from the same process.

Run with the separate Feast venv (not the project's): see RESULTS.md for the commands. Builds a minimal
feature repo (5 float card aggregates, FileSource parquet, PushSource), `feast apply`, materializes it into
the given Redis, then times one call at a time: PING, get_online_features (one card), write_to_online_store
(one row), push (one row) and get + write (what a served transaction needs: read the card's features, then
store its update; two separate calls, not atomic). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

FEATURES = ["card_txn_count_1h", "card_txn_count_24h", "card_amount_sum_24h", "seconds_since_prev_card_txn",
            "amount_to_card_mean_30d"]
VIEW = "card_aggregates"

DEFINITIONS = '''
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource
from feast.types import Float64
from feast.value_type import ValueType

card = Entity(name="card", join_keys=["card_id"], value_type=ValueType.INT64)
source = FileSource(path="{parquet}", timestamp_field="event_timestamp")
card_push = PushSource(name="card_push", batch_source=source)
card_aggregates = FeatureView(
    name="{view}", entities=[card], ttl=timedelta(days=30), online=True, source=card_push,
    schema=[{fields}],
)
'''


def write_repo(repo: Path, port: int, cards: int) -> None:
    """feature_store.yaml (redis online store on `port`), definitions.py and the card aggregates parquet."""
    (repo / "data").mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text(textwrap.dedent(f"""\
        project: treeops_feast_bench
        registry: {repo}/data/registry.db
        provider: local
        online_store:
          type: redis
          connection_string: "localhost:{port}"
        offline_store:
          type: file
        entity_key_serialization_version: 3
        """))
    parquet = repo / "data" / "card_aggregates.parquet"
    fields = ", ".join(f'Field(name="{f}", dtype=Float64)' for f in FEATURES)
    (repo / "definitions.py").write_text(DEFINITIONS.format(parquet=parquet, view=VIEW, fields=fields))
    rng = np.random.default_rng(0)
    now = datetime.now(UTC)
    frame = pd.DataFrame({
        "card_id": np.arange(cards, dtype=np.int64),
        "event_timestamp": [now - timedelta(minutes=int(m)) for m in rng.integers(1, 600, cards)],
        "card_txn_count_1h": rng.integers(0, 5, cards).astype(float),
        "card_txn_count_24h": rng.integers(0, 30, cards).astype(float),
        "card_amount_sum_24h": rng.gamma(2.0, 50.0, cards),
        "seconds_since_prev_card_txn": rng.exponential(3600.0, cards),
        "amount_to_card_mean_30d": rng.lognormal(0.0, 0.5, cards),
    })
    frame.to_parquet(parquet, index=False)


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
    parser.add_argument("--repo", type=Path, default=Path("/tmp/feastrepo"))
    parser.add_argument("--cards", type=int, default=5_000)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()

    import feast
    import redis
    from feast import FeatureStore
    from feast.data_source import PushMode
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    write_repo(args.repo, args.port, args.cards)
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "feast"), "apply"], cwd=args.repo, check=True,
                   stdout=subprocess.DEVNULL)
    apply_s = time.perf_counter() - started
    store = FeatureStore(repo_path=str(args.repo))
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # feast prints its progress to stdout
        store.materialize(start_date=datetime.now(UTC) - timedelta(days=1), end_date=datetime.now(UTC))
    materialize_s = time.perf_counter() - started

    client = redis.Redis(host="localhost", port=args.port)
    refs = [f"{VIEW}:{f}" for f in FEATURES]
    rng = random.Random(1)
    cards = [rng.randrange(args.cards) for _ in range(args.calls + args.warmup)]
    base = datetime.now(UTC)

    def row(i: int, offset: int) -> dict:
        """Call i's card with values offset + i, at a strictly newer event time per call (Feast skips a write
        whose timestamp is not newer than the stored one)."""
        return {"card_id": [cards[i]], "event_timestamp": [base + timedelta(milliseconds=offset + i)],
                **{f: [float(offset + i)] for f in FEATURES}}

    def read(i: int) -> dict:
        return store.get_online_features(features=refs, entity_rows=[{"card_id": cards[i]}]).to_dict()

    # Floors below the public API: the online store's own read/write with ready protobufs (no DataFrame, no
    # registry lookups), the least any Feast-based design pays.
    view, provider = store.get_feature_view(VIEW), store._get_provider()

    def key(i: int) -> EntityKey:
        return EntityKey(join_keys=["card_id"], entity_values=[Value(int64_val=cards[i])])

    def proto_write(i: int, offset: int) -> None:
        values = {f: Value(double_val=float(offset + i)) for f in FEATURES}
        at = base + timedelta(milliseconds=offset + i)
        provider.online_write_batch(store.config, view, [(key(i), values, at, None)], None)

    results = [
        timed("redis PING (redis-py)", args.calls, args.warmup, lambda i: client.ping()),
        timed("Feast get_online_features (1 card, 5 features, .to_dict())", args.calls, args.warmup, read),
        timed("Feast write_to_online_store (1 row)", args.calls, args.warmup,
              lambda i: store.write_to_online_store(VIEW, inputs=row(i, 10_000))),
        timed("Feast push to=ONLINE (1 row DataFrame)", args.calls, args.warmup,
              lambda i: store.push("card_push", pd.DataFrame(row(i, 20_000)), to=PushMode.ONLINE)),
        timed("floor: provider.online_read (1 entity key proto)", args.calls, args.warmup,
              lambda i: provider.online_read(store.config, view, [key(i)], FEATURES)),
        timed("floor: provider.online_write_batch (1 row of protos)", args.calls, args.warmup, lambda i: proto_write(i, 25_000)),
        timed("floor: online_read + online_write_batch (2 calls, not atomic)", args.calls, args.warmup,
              lambda i: (provider.online_read(store.config, view, [key(i)], FEATURES), proto_write(i, 27_500))),
        timed("Feast read + write_to_online_store (2 calls, not atomic)", args.calls, args.warmup,
              lambda i: (read(i), store.write_to_online_store(VIEW, inputs=row(i, 30_000)))),
    ]
    last = args.warmup + args.calls - 1
    got = read(last)
    assert got[FEATURES[0]] == [30_000.0 + last], f"the last write is not what the store returns: {got}"
    print(json.dumps({"feast": feast.__version__, "redis_py": redis.__version__, "python": platform.python_version(),
                      "apply_s": round(apply_s, 2), "materialize_s": round(materialize_s, 2),
                      "cards": args.cards, "results": results}, indent=1))


if __name__ == "__main__":
    main()
