"""Operating the online store with a real redis-server: restarts and crashes keep the state, one server per
directory, and `treeops features backfill|show` end to end (output, state, errors that change nothing)."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import redis

from backends.online_history import OnlineHistory, connect
from export.pipeline import ExportSettings, export_model
from export.repository import ModelRepository
from online_store.backfill import backfill
from online_store.errors import RedisStartError
from online_store.redis_server import LocalRedis, free_port
from online_store.spec import online_history
from redis_fixtures import local_redis
from server.client import load_features
from training.features import FittedFeatures
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace

MODEL = "fraud"  # the CLI's default --model-name
MINUTE_US = 60 * 1_000_000
#: A pause longer than appendfsync everysec's loss window (1 s, 2 s while Redis postpones a slow fsync).
FSYNC_PAUSE_S = 2.5


@dataclass(frozen=True)
class Exported:
    ws: Workspace
    data: Path  # the training transactions: the backfill input
    features: FittedFeatures


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A model trained on history features and exported with --raw-inputs (it reads the online store)."""
    before = mlflow.get_tracking_uri()
    ws = Workspace(tmp_path_factory.mktemp("online_store"))
    data = write_transactions(generate_transactions(GenerateSpec(rows=3_000, seed=5)), ws.data_dir / "t.parquet")
    try:
        train_and_register(data, "is_fraud", MODEL, params=TrainParams(num_boost_round=10),
                           tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
        mlflow.set_tracking_uri(ws.tracking_uri)
        result = export_model(MODEL, ModelRepository(ws.model_repository), settings=ExportSettings(raw_inputs=True))
    finally:
        mlflow.set_tracking_uri(before)
    return Exported(ws, data, load_features(result.version_dir))


@pytest.fixture
def workspace(exported: Exported, tmp_path: Path) -> Path:
    """A fresh workspace serving the exported model: its own online_store/ folder, nothing running."""
    root = tmp_path / "ws"
    shutil.copytree(exported.ws.model_repository, root / "model_repository")
    return root


@pytest.fixture
def workspace_redis(workspace: Path) -> Iterator[LocalRedis]:
    """The workspace's redis-server running (as under `treeops serve`): the features commands use it."""
    with local_redis(workspace) as server:
        yield server


def _stream(rows: int, seed: int, first_id: int) -> pl.DataFrame:
    """Live transactions of the backfilled cards (same generator), in time order."""
    return generate_transactions(GenerateSpec(rows=rows, seed=seed), first_id=first_id).sort("timestamp",
                                                                                            "transaction_id")


def _send(history: OnlineHistory, frame: pl.DataFrame) -> np.ndarray:
    """Score `frame`'s transactions as the served model does (one call: each card's rows in time order)."""
    return history.features(frame["card_id"].to_numpy(), frame["timestamp"].dt.epoch("us").to_numpy(),
                            {"amount": frame["amount"].to_numpy()}, frame["transaction_id"].to_numpy())


def _dump(client: redis.Redis, pattern: str = "*") -> dict[bytes, object]:
    """Every matching key's content: sorted sets with their scores, hashes as dicts."""
    out: dict[bytes, object] = {}
    for key in client.scan_iter(match=pattern, count=1_000):
        kind = client.type(key)
        out[key] = client.zrange(key, 0, -1, withscores=True) if kind == b"zset" else client.hgetall(key)
    return out


def _card_keys(history: OnlineHistory, cards: list[int]) -> set[bytes]:
    return {key for card in cards for key in history.keys(card)}


def _probe(history: OnlineHistory, cards: list[int], at_us: int) -> np.ndarray:
    """Read-only: the features a transaction of 20.0 at `at_us` of each card would get."""
    n = len(cards)
    return history.features(np.array(cards), np.full(n, at_us), {"amount": np.full(n, 20.0)},
                            np.array([f"probe-{c}" for c in cards]), update=False)


def _loaded(url: str, exported: Exported) -> tuple[redis.Redis, OnlineHistory, list[int], int]:
    """Backfill the training file into `url` plus some live transactions; the client, the store, every card
    and a probe time after all of them."""
    client = connect(url)
    history = online_history(exported.features, client, url)
    backfill(url, exported.features, exported.data)
    live = _stream(400, seed=11, first_id=10_000_000)
    _send(history, live)
    data = pl.read_parquet(exported.data)
    cards = sorted(set(data["card_id"].to_list()) | set(live["card_id"].to_list()))
    newest = max(data["timestamp"].max(), live["timestamp"].max())
    return client, history, cards, int(pl.Series([newest]).dt.epoch("us")[0]) + 10 * MINUTE_US


def test_a_gracefully_restarted_redis_keeps_every_entitys_state(exported: Exported, tmp_path: Path) -> None:
    with local_redis(tmp_path) as server:
        client, history, cards, at = _loaded(server.url, exported)
        state, answers = _dump(client), _probe(history, cards, at)
        assert state and np.isfinite(answers).any()
        server.stop()
        assert not server.running
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()  # same directory and port: the AOF is reloaded
        assert _dump(client) == state
        np.testing.assert_array_equal(_probe(history, cards, at), answers)
        history.close()
        client.close()


def test_a_killed_redis_keeps_every_write_acknowledged_before_a_pause(exported: Exported, tmp_path: Path) -> None:
    """appendfsync everysec: Redis writes the AOF before it replies and fsyncs it every second, so a crash loses
    at most the writes of about the last 1-2 s (what a kill -9 of the process alone loses is not asserted).
    Asserted: everything acknowledged before a pause of FSYNC_PAUSE_S survives, and of the transactions sent
    after it a prefix survives (each one applied whole or not at all)."""
    with local_redis(tmp_path) as server:
        client, history, cards, at = _loaded(server.url, exported)
        late = _stream(600, seed=12, first_id=20_000_000)
        late_cards = sorted(set(late["card_id"].to_list()))[:3]
        late = late.filter(pl.col("card_id").is_in(late_cards)).head(40)
        others = [c for c in cards if c not in late_cards]
        watched = _card_keys(history, late_cards)
        time.sleep(FSYNC_PAUSE_S)
        durable, durable_answers = _dump(client), _probe(history, others, at)
        prefixes = [{k: v for k, v in durable.items() if k in watched}]
        for i in range(late.height):  # one acknowledged call per transaction, as clients send them
            _send(history, late[i:i + 1])
            prefixes.append({k: v for k, v in _dump(client).items() if k in watched})
        assert prefixes[-1] != prefixes[0]
        server.kill()
        assert server.process.returncode == -signal.SIGKILL
        server.start()
        restored = _dump(client)
        assert {k: v for k, v in restored.items() if k not in watched} == \
               {k: v for k, v in durable.items() if k not in watched}
        assert {k: v for k, v in restored.items() if k in watched} in prefixes
        np.testing.assert_array_equal(_probe(history, others, at), durable_answers)
        history.close()
        client.close()


def test_a_second_local_redis_on_a_running_directory_is_refused(tmp_path: Path) -> None:
    with local_redis(tmp_path) as first:
        connect(first.url).set("kept", "yes")
        with pytest.raises(RedisStartError, match=re.escape(f"already runs at {first.url}")):
            LocalRedis(tmp_path).start()
        other_process = subprocess.run(
            [sys.executable, "-c", f"from online_store.redis_server import LocalRedis; LocalRedis({str(tmp_path)!r}).start()"],
            capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
        assert other_process.returncode != 0
        assert f"RedisStartError: a redis-server of this workspace already runs at {first.url}" in other_process.stderr
        assert first.running and connect(first.url).get("kept") == b"yes"


def test_of_two_local_redis_starting_at_once_on_one_directory_one_runs(tmp_path: Path) -> None:
    """Before the first answers PING (or while it loads a large AOF) nothing but the directory lock stops a second."""
    servers = [LocalRedis(tmp_path), LocalRedis(tmp_path)]
    barrier = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def start(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = servers[i].start()
        except RedisStartError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(type(o).__name__ for o in outcomes) == ["LocalRedis", "RedisStartError"], outcomes
        assert f"data in {tmp_path / 'online_store'}" in str(next(o for o in outcomes if isinstance(o, Exception)))
    finally:
        for s in servers:
            s.kill()


# --- the CLI, through the installed `treeops` entry point ---------------------------------------------------------


def _error_line(out: subprocess.CompletedProcess[str]) -> str:
    """The one `error: ...` line of a failed command (no traceback)."""
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    return errors[0]


def test_features_backfill_prints_rows_and_rate_and_leaves_the_streamed_state(exported, workspace, treeops,
                                                                               tmp_path) -> None:
    """No store configured or running: the command runs the workspace's redis-server for itself and stops it
    cleanly; the state it leaves is the one streaming the file's transactions in time order leaves."""
    out = treeops("features", "backfill", "--data", str(exported.data), workspace=workspace)
    assert out.returncode == 0, out.stderr
    data = pl.read_parquet(exported.data)
    line = re.fullmatch(r"backfilled ([\d,]+) transactions of ([\d,]+) entities into redis://127\.0\.0\.1:\d+/0 "
                        r"\(([\d,]+) kept within the windows\) in [\d.]+ s: ([\d,]+) rows/s", out.stdout.strip())
    assert line is not None, out.stdout
    rows, entities, kept, rate = (int(g.replace(",", "")) for g in line.groups())
    assert (rows, entities) == (data.height, data["card_id"].n_unique())
    assert 0 < kept <= rows and rate > 0

    with local_redis(workspace) as stored, local_redis(tmp_path / "reference") as reference:
        streamed = connect(reference.url)
        _send(online_history(exported.features, streamed, reference.url), data.sort("timestamp", maintain_order=True))
        assert _dump(connect(stored.url)) == _dump(streamed)
        assert sum(len(members) for members in _dump(streamed, "*:z").values()) == kept

    again = treeops("features", "backfill", "--data", str(exported.data), "--json", workspace=workspace)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["rows"], summary["entities"], summary["stored"]) == (rows, entities, kept)
    assert summary["rows_per_s"] > 0 and summary["store_url"].startswith("redis://127.0.0.1:")


def test_features_show_prints_the_window_and_the_next_transactions_features(exported, workspace, workspace_redis,
                                                                             treeops) -> None:
    backfill(workspace_redis.url, exported.features, exported.data)
    client = connect(workspace_redis.url)
    data = pl.read_parquet(exported.data)
    card = data["card_id"].mode().sort()[0]
    own = data.filter(pl.col("card_id") == card).sort("timestamp")
    at = own["timestamp"][-1] + dt.timedelta(minutes=30)
    before = _dump(client)

    out = treeops("features", "show", "--entity", f"card_id={card}", "--at", at.isoformat(), "--value", "amount=20",
                  "--json", workspace=workspace)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout, parse_constant=_refuse)  # strict JSON: a missing feature is null, never NaN
    assert shown["store_url"] == workspace_redis.url and shown["arrivals"] == own.height
    features = {k: float("nan") if v is None else v for k, v in shown["features"].items()}
    retention_us = online_history(exported.features, client, workspace_redis.url).retention_us
    kept = own.filter(pl.col("timestamp") >= own["timestamp"][-1] - dt.timedelta(microseconds=retention_us))
    members = [(m["time_us"], m["transaction_id"], m["values"]["amount"]) for m in shown["members"]]
    assert [t for t, _, _ in members] == sorted(t for t, _, _ in members)  # oldest first
    assert sorted(members) == sorted(zip(kept["timestamp"].dt.epoch("us").to_list(),
                                         map(str, kept["transaction_id"]), kept["amount"].to_list()))

    # Offline: the spec's own features of that transaction appended to the file.
    nxt = own[-1:].with_columns(timestamp=pl.lit(at).cast(own["timestamp"].dtype), amount=pl.lit(20.0),
                                transaction_id=pl.lit(-1, dtype=pl.Int64))
    offline = exported.features.spec.compute(pl.concat([data, nxt]).lazy()).collect()[-1]
    assert list(features) == [f.name for f in exported.features.spec.features if f.history is not None]
    np.testing.assert_array_equal(list(features.values()), [offline[n][0] for n in features])
    assert any(np.isfinite(v) and v != 0 for v in features.values())  # a history to compare

    human = treeops("features", "show", "--entity", f"card_id={card}", "--at", at.isoformat(), "--value", "amount=20",
                    workspace=workspace)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0] == f"card_id={card}: {own.height} transactions arrived, {kept.height} kept " \
                       "(within the longest window, oldest first)"
    assert [re.search(r"transaction (\S+)", line)[1] for line in lines[1:1 + kept.height]] == \
           [txn for _, txn, _ in members]
    assert lines[1 + kept.height].endswith("amount=20.0 would get:")
    assert lines[2 + kept.height:] == [f"  {k} = {v!r}" for k, v in features.items()]
    assert _dump(client) == before  # show only reads

    # A card the store has never seen: its features are missing, written as null.
    fresh = treeops("features", "show", "--entity", "card_id=-5", "--json", workspace=workspace)
    assert fresh.returncode == 0, fresh.stderr
    empty = json.loads(fresh.stdout, parse_constant=_refuse)
    assert empty["values"] == {"amount": None} and empty["features"]["seconds_since_prev_card_txn"] is None


def _refuse(name: str) -> None:
    raise AssertionError(f"{name} in JSON output: not strict JSON")


@pytest.mark.parametrize(("args", "code", "says"), [
    (["show", "--entity", "user_id=1"], 2, "feature spec 'card_transactions_v2' keeps history by ['card_id']; "
                                           "write --entity card_id=VALUE"),
    (["show", "--entity", "card_id"], 2, "--entity 'card_id': write it as NAME=VALUE"),
    (["show", "--entity", "card_id=1", "--value", "amount=abc"], 2, "--value 'amount=abc': 'abc' is not a number"),
    (["show", "--entity", "card_id=1", "--value", "amout=20"], 2, "read no 'amout'; they read ['amount']"),
    (["show", "--entity", "card_id=1", "--at", "yesterday"], 2, "--at 'yesterday' is not an ISO 8601 time"),
    (["backfill", "--data", "{ws}/missing.parquet"], 1, "missing.parquet does not exist"),
], ids=["unknown-entity", "entity-without-value", "value-not-a-number", "unknown-value", "bad-time", "missing-data"])
def test_bad_input_fails_with_a_clear_error_and_changes_nothing(args, code, says, exported, workspace,
                                                                 workspace_redis, treeops) -> None:
    backfill(workspace_redis.url, exported.features, exported.data)
    client = connect(workspace_redis.url)
    before = _dump(client)
    out = treeops("features", *(a.format(ws=workspace) for a in args), workspace=workspace)
    assert out.returncode == code, out.stderr
    assert says in _error_line(out)
    assert out.stdout == ""
    assert _dump(client) == before and workspace_redis.running


@pytest.mark.parametrize("args", [["show", "--entity", "card_id=1"], ["backfill", "--data", "{data}"]],
                         ids=["show", "backfill"])
def test_an_unreachable_store_is_named_and_nothing_starts(args, exported, workspace, treeops, monkeypatch) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("TREEOPS_ONLINE_STORE_URL", url)
    out = treeops("features", *(a.format(data=exported.data) for a in args), workspace=workspace)
    assert out.returncode == 1, out.stderr
    assert f"online store {url} did not answer" in _error_line(out)
    assert "set TREEOPS_ONLINE_STORE_URL to a running one" in out.stderr
    assert not (workspace / "online_store").exists()  # the configured URL is used, no local server instead
