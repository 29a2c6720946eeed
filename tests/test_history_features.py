"""History features: the windowed rule (ties, window edges), row-order independence, the arrival-order
reference and a user's own entity."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.errors import DataError
from training.features import Feature, FeatureSpec, history_feature
from training.history import History, as_arrived

T0 = dt.datetime(2026, 5, 1, 12, 0)
ALL = (History("count", "1h"), History("sum", "1h", value="amount"), History("mean", "1h", value="amount"),
       History("seconds_since_prev", "1h"), History("ratio_to_mean", "1h", value="amount"))
FEATURES = tuple(history_feature(h.aggregate, h, h.aggregate) for h in ALL)


def _frame(rows: list[tuple[int, dt.datetime, float]]) -> pl.DataFrame:
    card, ts, amount = zip(*rows)
    return pl.DataFrame({"transaction_id": range(1, len(rows) + 1), "card_id": card, "timestamp": ts,
                         "amount": amount}, schema={"transaction_id": pl.Int64, "card_id": pl.Int64,
                                                    "timestamp": pl.Datetime("us"), "amount": pl.Float64})


def _offline(raw: pl.DataFrame, features=FEATURES) -> pl.DataFrame:
    return raw.lazy().select(f.expr.alias(f.name) for f in features).collect()


def _rows(frame: pl.DataFrame) -> list[dict]:
    return list(frame.iter_rows(named=True))


def test_equal_timestamps_never_see_each_other():
    raw = _frame([(1, T0, 10.0), (1, T0, 20.0), (1, T0, 30.0), (1, T0 + dt.timedelta(seconds=1), 60.0)])
    r = _rows(_offline(raw))
    assert [x["count"] for x in r] == [0, 0, 0, 3]
    assert [x["sum"] for x in r[:3]] == [0.0, 0.0, 0.0] and r[3]["sum"] == 60.0
    assert all(np.isnan(x["mean"]) and np.isnan(x["seconds_since_prev"]) and np.isnan(x["ratio_to_mean"])
               for x in r[:3])
    assert r[3]["mean"] == 20.0 and r[3]["ratio_to_mean"] == 3.0 and r[3]["seconds_since_prev"] == 1.0


def test_window_start_is_included_and_the_current_time_excluded():
    hour = dt.timedelta(hours=1)
    raw = _frame([(1, T0 - hour - dt.timedelta(microseconds=1), 1.0),  # just outside the window
                  (1, T0 - hour, 2.0),                                    # exactly t - window: inside
                  (1, T0 - dt.timedelta(microseconds=1), 4.0),
                  (1, T0, 8.0)])
    last = _rows(_offline(raw))[-1]
    assert last["count"] == 2 and last["sum"] == 6.0 and last["seconds_since_prev"] == 1e-6
    assert last["ratio_to_mean"] == 8.0 / 3.0


def test_other_entities_and_null_keys_are_not_history():
    raw = _frame([(1, T0, 5.0), (2, T0 + dt.timedelta(minutes=1), 7.0), (1, T0 + dt.timedelta(minutes=2), 1.0)])
    raw = pl.concat([raw, raw.head(1).with_columns(card_id=None, transaction_id=pl.lit(9, pl.Int64))])
    r = _rows(_offline(raw))
    assert [x["count"] for x in r[:3]] == [0, 0, 1] and r[2]["sum"] == 5.0
    assert np.isnan(r[3]["count"])  # no entity: no feature, and in nobody's history


def test_mean_of_zero_gives_no_ratio():
    raw = _frame([(1, T0, 0.0), (1, T0 + dt.timedelta(minutes=1), 5.0)])
    last = _rows(_offline(raw))[-1]
    assert last["mean"] == 0.0 and np.isnan(last["ratio_to_mean"])


def _random_stream(seed: int, n: int, cards: int = 30) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    # Minute-resolution times over 6 hours: many ties and many rows on the 1 h window edge.
    minutes = rng.integers(0, 360, n)
    return pl.DataFrame({
        "transaction_id": np.arange(1, n + 1), "card_id": rng.integers(0, cards, n),
        "timestamp": pl.Series((minutes * 60_000_000).astype(np.int64)).cast(pl.Datetime("us")),
        "amount": np.round(rng.exponential(40, n), 2)})


def test_row_order_engine_and_file_chunks_do_not_change_features(tmp_path):
    raw = _random_stream(3, 60_000, cards=800)
    expected = _offline(raw).with_columns(raw["transaction_id"])
    shuffled = raw.sample(fraction=1.0, shuffle=True, seed=1)
    shuffled.write_parquet(tmp_path / "t.parquet", row_group_size=7_000)
    for source in (shuffled.lazy(), pl.scan_parquet(tmp_path / "t.parquet")):
        for engine in ("in-memory", "streaming"):
            got = (source.select(*(f.expr.alias(f.name) for f in FEATURES), "transaction_id")
                   .collect(engine=engine).sort("transaction_id"))
            assert got.equals(expected), engine


def test_arrival_in_timestamp_order_equals_the_offline_expression_exactly():
    raw = _random_stream(5, 4_000).sample(fraction=1.0, shuffle=True, seed=4)
    # Arrival = timestamp order; ties arrive in any order (here: by id), which must not matter.
    raw = raw.with_columns(arrival=pl.struct("timestamp", "transaction_id").rank("ordinal"))
    ref = as_arrived(raw, FEATURES, "arrival")
    assert ref.equals(_offline(raw))  # bit-exact, NaN where empty


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 7_200), st.sampled_from([0.0, 0.1, 0.2, 3.3, 1e6])),
                min_size=1, max_size=40))
def test_reference_equals_expression_on_random_streams(rows):
    raw = _frame([(c, T0 + dt.timedelta(seconds=s), v) for c, s, v in rows])
    raw = raw.with_columns(arrival=pl.struct("timestamp", "transaction_id").rank("ordinal"))
    assert as_arrived(raw, FEATURES, "arrival").equals(_offline(raw))


def test_a_late_arrival_sees_only_what_arrived_before_it_and_changes_no_given_score():
    m = dt.timedelta(minutes=1)
    # id 3 (12:02) arrives last, after id 4 (12:05) and id 5 (12:10) were scored.
    raw = _frame([(1, T0, 10.0), (1, T0 + m, 20.0), (1, T0 + 2 * m, 90.0), (1, T0 + 5 * m, 30.0),
                  (1, T0 + 10 * m, 40.0)]).with_columns(arrival=pl.Series([1, 2, 5, 3, 4]))
    live = _rows(as_arrived(raw, FEATURES, "arrival"))
    before = _rows(as_arrived(raw.filter(pl.col("transaction_id") != 3), FEATURES, "arrival"))
    assert live[3] == before[2] and live[4] == before[3]  # ids 4 and 5: scores given before id 3 arrived
    offline = _rows(_offline(raw))
    assert live[2] == offline[2] and live[2]["sum"] == 30.0  # id 3 sees the earlier times 10 and 20 ...
    assert live[3]["count"] == 2 and offline[3]["count"] == 3  # ... and id 4, scored before it, never sees it
    assert live[4]["sum"] == 60.0 and offline[4]["sum"] == 150.0


def test_a_user_spec_declares_history_for_its_own_entity():
    spec = FeatureSpec("merchant_visits", {"merchant": pl.String(), "at": pl.Datetime("ms"), "spend": pl.Float64()}, (
        Feature("spend", pl.col("spend"), "spend"),
        history_feature("merchant_visits_7d", History("count", "7d", entity="merchant", time="at"), "visits"),
        history_feature("merchant_spend_mean_7d", History("mean", "7d", entity="merchant", time="at", value="spend"),
                        "mean spend"),
    ))
    day = dt.timedelta(days=1)
    raw = pl.DataFrame({"merchant": ["a", "b", "a", "a"], "at": [T0, T0, T0 + day, T0 + 7 * day],
                        "spend": [1.0, 100.0, 3.0, 5.0]}, schema=spec.raw_schema)
    got = spec.compute(raw.lazy()).collect()
    assert got["merchant_visits_7d"].to_list() == [0.0, 0.0, 1.0, 2.0]  # T0 is exactly 7 d before the last: in
    assert got["merchant_spend_mean_7d"][2] == 1.0
    assert [f.name for f in spec.features if f.stateful] == ["merchant_visits_7d", "merchant_spend_mean_7d"]
    stored = spec.fit(got).to_dict()["features"][1]["history"]
    assert stored == {"aggregate": "count", "window": "7d", "window_us": 7 * 86_400_000_000, "entity": "merchant",
                      "time": "at", "value": None}
    assert as_arrived(raw.with_row_index("arrival"), spec.features, "arrival").equals(got)


def test_the_fingerprint_covers_the_declaration():
    def spec(window: str) -> FeatureSpec:
        return FeatureSpec("s", {}, (history_feature("n", History("count", window), "n"),))
    assert spec("1h").fingerprint() != spec("2h").fingerprint()
    assert spec("1h").fingerprint() == spec("1h").fingerprint()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"aggregate": "sum", "window": "1h"}, "needs a value column"),
    ({"aggregate": "count", "window": "1h", "value": "amount"}, "takes no value column"),
    ({"aggregate": "count", "window": "1mo"}, "fixed duration"),
    ({"aggregate": "count", "window": "0h"}, "positive"),
    ({"aggregate": "median", "window": "1h"}, "unknown history aggregate"),
])
def test_bad_declarations_say_what_to_write(kwargs, message):
    with pytest.raises(DataError, match=message):
        History(**kwargs)


def test_window_units():
    assert History("count", "1h30m").window_us == 5_400_000_000
    assert History("count", "30d").window_us == 30 * 86_400_000_000
    assert History("count", "250ms").window_us == 250_000


def test_arrival_must_be_unique():
    raw = _frame([(1, T0, 1.0), (1, T0, 2.0)]).with_columns(arrival=pl.lit(1))
    with pytest.raises(DataError, match="unique"):
        as_arrived(raw, FEATURES, "arrival")
