"""The late allowance is declared once, on the feature spec: the fitted JSON carries it, the real store prunes
with it and the offline reference applies it. Store URLs with a password never appear in results or errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from backends.online_history import LATE_ARRIVAL_KEY, OnlineHistory, StoreUnavailable, connect, redacted
from online_store.backfill import backfill
from online_store.errors import StoreUnavailableError
from online_store.redis_server import LocalRedis, free_port
from online_store.show import show
from online_store.spec import online_history
from redis_fixtures import local_redis
from server.replay import offline_matrix
from training.errors import DataError
from training.features import DEFAULT_LATE_ARRIVAL, FRAUD_FEATURES, FeatureSpec, FittedFeatures
from training.history import as_arrived

pytest_plugins = ("redis_fixtures",)

HOUR = 3_600_000_000
DAY = 24 * HOUR
T0 = 1_767_225_600_000_000  # 2026-01-01 UTC
RAW = {"transaction_id": pl.Int64(), "card_id": pl.Int64(), "timestamp": pl.Datetime("us"), "amount": pl.Float64()}
SHORT = FeatureSpec("late_arrival_v1", RAW, tuple(f for f in FRAUD_FEATURES.features if f.history),
                    late_arrival=dt.timedelta(hours=1))
# Card 1 at T0, its newest 30 d + 2 h later, then one at T0 + 29 d arriving 1 d 2 h behind it: a 1 h allowance
# has pruned T0 from that late one's 30 d window, the default 1 d has not.
ROWS = [(1, 1, T0, 1.0), (2, 1, T0 + 30 * DAY + 2 * HOUR, 5.0), (3, 1, T0 + 29 * DAY, 2.0)]


def _frame(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame({"transaction_id": [r[0] for r in rows], "card_id": [r[1] for r in rows],
                         "timestamp": pl.Series([r[2] for r in rows]).cast(pl.Datetime("us")),
                         "amount": [r[3] for r in rows], "arrival": list(range(len(rows)))})


def _round_trip(fitted: FittedFeatures, code_spec: FeatureSpec) -> FittedFeatures:
    return FittedFeatures.from_dict(code_spec, json.loads(json.dumps(fitted.to_dict(), allow_nan=False)))


def test_fitted_json_carries_the_allowance_and_old_json_gets_one_day() -> None:
    fitted = FittedFeatures(SHORT, {})
    assert fitted.to_dict()[LATE_ARRIVAL_KEY] == HOUR
    # the stored value wins over the code's (a version keeps the allowance it was exported with)
    again = _round_trip(fitted, dataclasses.replace(SHORT, late_arrival=DEFAULT_LATE_ARRIVAL))
    assert again.spec.late_arrival == dt.timedelta(hours=1) and again.spec_hash() == fitted.spec_hash()
    assert fitted.spec.fingerprint() == FittedFeatures(dataclasses.replace(SHORT, late_arrival=dt.timedelta(0)),
                                                       {}).spec.fingerprint()  # offline features do not change
    assert fitted.spec_hash() != FittedFeatures(dataclasses.replace(SHORT, late_arrival=DEFAULT_LATE_ARRIVAL),
                                                {}).spec_hash()  # online answers to late arrivals do
    old = {k: v for k, v in fitted.to_dict().items() if k != LATE_ARRIVAL_KEY}
    assert FittedFeatures.from_dict(SHORT, old).spec.late_arrival == DEFAULT_LATE_ARRIVAL == dt.timedelta(days=1)


@pytest.mark.parametrize(("late", "says"), [(dt.timedelta(seconds=-1), "late_arrival is"), (3600, "late_arrival is")])
def test_a_negative_or_untyped_allowance_is_refused_naming_the_spec(late: object, says: str) -> None:
    with pytest.raises(DataError, match=f"feature spec 'late_arrival_v1': {says}.*timedelta >= 0"):
        dataclasses.replace(SHORT, late_arrival=late)


@pytest.mark.parametrize("stored", [-1, "1h", 1.5])
def test_a_bad_stored_allowance_is_refused(stored: object) -> None:
    data = {**FittedFeatures(SHORT, {}).to_dict(), LATE_ARRIVAL_KEY: stored}
    with pytest.raises(DataError, match="late_arrival"):
        FittedFeatures.from_dict(SHORT, data)


def test_the_store_truncates_the_window_exactly_as_the_spec_allowance_predicts(store, redis_server) -> None:
    fitted = _round_trip(FittedFeatures(SHORT, {}), SHORT)
    h = online_history(fitted, store, redis_server.url)
    assert h.late_us == HOUR
    frame = _frame(ROWS)
    got = np.vstack([h.features(np.array([c]), np.array([t]), {"amount": np.array([a])}, np.array([i]))
                     for i, c, t, a in ROWS])
    h.close()
    want = as_arrived(frame, fitted.spec.features, "arrival", late_us=fitted.spec.late_arrival_us).to_numpy()
    np.testing.assert_array_equal(got, want)
    whole = as_arrived(frame, fitted.spec.features, "arrival", late_us=DAY)
    assert not np.array_equal(want[2], whole[2], equal_nan=True)  # the 1 h allowance did cut the late one's window
    # the replay reference reads the same allowance from the fitted spec
    stream = frame.drop("arrival")
    np.testing.assert_array_equal(offline_matrix(fitted, stream.head(0), stream), fitted.matrix(pl.DataFrame(
        {n: want[:, k] for k, n in enumerate(fitted.spec.names)})))


@pytest.fixture
def secret_store(tmp_path: Path) -> LocalRedis:
    with local_redis(tmp_path / "secret") as server:
        connect(server.url).config_set("requirepass", "secret")
        yield server


def test_store_urls_with_a_password_are_never_shown(secret_store: LocalRedis, tmp_path: Path) -> None:
    url = f"redis://:secret@127.0.0.1:{secret_store.port}/0"
    assert redacted(url) == f"redis://:***@127.0.0.1:{secret_store.port}/0"
    assert redacted("redis://me:secret@h:1/0") == "redis://me:***@h:1/0" and redacted("redis://h/0") == "redis://h/0"
    fitted = FittedFeatures(SHORT, {})
    data = tmp_path / "rows.parquet"
    _frame(ROWS).drop("arrival").write_parquet(data)
    result = backfill(url, fitted, data)
    assert result.rows == 3 and result.store_url == redacted(url)
    state = show(url, fitted, "1", at_us=T0 + 31 * DAY)
    assert state.arrivals == 3
    shown = [json.dumps(result.to_dict()), *result.lines(), json.dumps(state.to_dict()), *state.lines()]
    assert not [s for s in shown if "secret" in s]

    down = f"redis://:secret@127.0.0.1:{free_port()}/0"
    wrong = f"redis://:secrets@127.0.0.1:{secret_store.port}/0"
    for bad in (down, wrong):
        with pytest.raises(StoreUnavailableError) as failed:
            backfill(bad, fitted, data)
        assert "secret" not in str(failed.value) and redacted(bad) in str(failed.value)
        with pytest.raises(StoreUnavailableError) as failed:
            show(bad, fitted, "1")
        assert "secret" not in str(failed.value)
    h = OnlineHistory(connect(down, retries=0), down, "ns", fitted.to_dict()["features"], late_us=0)
    with pytest.raises(StoreUnavailable) as failed:
        h.features(np.array([1]), np.array([T0]), {"amount": np.array([1.0])}, np.array([1]))
    assert "secret" not in str(failed.value) and "***" in str(failed.value)
