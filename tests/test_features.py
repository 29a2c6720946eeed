"""The feature spec: deterministic under ties, engine-independent, unknown categories -> NaN."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from training.errors import DataError
from training.features import FRAUD_FEATURES, FittedFeatures, columns_spec
from training.generate import GenerateSpec, generate_transactions
from training.train import TrainParams, train_model


def _raw() -> pl.DataFrame:
    t = dt.datetime(2026, 3, 7, 23, 30)  # a Saturday
    return pl.DataFrame(
        {
            "transaction_id": [4, 2, 3, 1, 5],
            "card_id": [1, 1, 2, 1, 1],
            "timestamp": [t, t, t, t - dt.timedelta(hours=1), t + dt.timedelta(seconds=90)],
            "amount": [40.0, 20.0, 5.0, 10.0, 30.0],
            "merchant_category": ["grocery", "fuel", "grocery", "fuel", "casino"],
            "country": ["US", "US", "DE", "US", "US"],
            "channel": ["pos", "online", "pos", "pos", "pos"],
        },
        schema=FRAUD_FEATURES.raw_schema,
    )


def test_history_features_do_not_see_equal_timestamps():
    f = FRAUD_FEATURES.compute(_raw().lazy()).collect()
    by_id = dict(zip(_raw()["transaction_id"], f.iter_rows(named=True)))
    # card 1: id1 (22:30, 10), id2 and id4 (both 23:30, 20 and 40), id5 (23:31:30, 30)
    assert [by_id[i]["card_txn_count_24h"] for i in (1, 2, 4, 5)] == [0, 1, 1, 3]
    assert [by_id[i]["card_txn_count_1h"] for i in (1, 2, 4, 5)] == [0, 1, 1, 2]  # 22:30 is exactly 1 h before 23:30
    assert by_id[5]["card_amount_sum_24h"] == 70.0
    assert by_id[2]["seconds_since_prev_card_txn"] == 3600
    assert by_id[4]["seconds_since_prev_card_txn"] == 3600
    assert by_id[5]["seconds_since_prev_card_txn"] == 90
    assert np.isnan(by_id[1]["seconds_since_prev_card_txn"])
    assert by_id[4]["amount_to_card_mean_30d"] == 4.0
    assert by_id[5]["amount_to_card_mean_30d"] == pytest.approx(30.0 / (70.0 / 3))
    assert by_id[3]["card_txn_count_24h"] == 0 and by_id[3]["card_amount_sum_24h"] == 0.0


def test_history_declarations_are_stored_with_the_spec():
    data = FRAUD_FEATURES.fit(FRAUD_FEATURES.compute(_raw().lazy())).to_dict()
    hist = {f["name"]: f["history"] for f in data["features"] if f["history"]}
    assert list(hist) == ["card_txn_count_1h", "card_txn_count_24h", "card_amount_sum_24h",
                          "seconds_since_prev_card_txn", "amount_to_card_mean_30d"]
    assert hist["card_amount_sum_24h"] == {"aggregate": "sum", "window": "24h", "window_us": 86_400_000_000,
                                           "entity": "card_id", "time": "timestamp", "value": "amount"}
    assert [f.name for f in FRAUD_FEATURES.features if f.stateful] == list(hist)
    assert data["features"][0]["history"] is None


def test_stateless_features():
    f = FRAUD_FEATURES.compute(_raw().lazy()).collect()
    assert f["hour_of_day"].to_list() == [23, 23, 23, 22, 23]
    assert f["is_weekend"].to_list() == [1, 1, 1, 1, 1]
    assert f["log_amount"][0] == pytest.approx(np.log1p(40.0))


def test_row_order_does_not_change_features():
    raw = _raw()
    a = FRAUD_FEATURES.compute(raw.lazy()).collect().with_columns(raw["transaction_id"]).sort("transaction_id")
    shuffled = raw.sample(fraction=1.0, shuffle=True, seed=1)
    b = FRAUD_FEATURES.compute(shuffled.lazy()).collect().with_columns(shuffled["transaction_id"]).sort("transaction_id")
    assert a.equals(b)


def test_in_memory_and_streaming_engines_agree():
    raw = generate_transactions(GenerateSpec(rows=5_000, seed=11))
    computed = FRAUD_FEATURES.compute(raw.lazy())
    fitted = FRAUD_FEATURES.fit(computed)
    lazy = fitted.encode(computed)
    a = lazy.collect(engine="in-memory")
    b = lazy.collect(engine="streaming")
    assert a.equals(b)


def test_unknown_categories_encode_as_missing():
    fitted = FRAUD_FEATURES.fit(FRAUD_FEATURES.compute(_raw().head(4).lazy()))  # no "casino" in the vocabulary
    assert "casino" not in fitted.vocabularies["merchant_category"]
    x = fitted.matrix_raw(_raw())
    col = FRAUD_FEATURES.names.index("merchant_category")
    assert np.isnan(x[4, col])
    assert not np.isnan(x[:4, col]).any()
    assert x.dtype == np.float32 and x.flags.c_contiguous


def test_spec_round_trips_through_json_and_refuses_other_code():
    fitted = FRAUD_FEATURES.fit(FRAUD_FEATURES.compute(_raw().lazy()))
    data = fitted.to_dict()
    again = FittedFeatures.from_dict(FRAUD_FEATURES, data)
    assert again.spec_hash() == fitted.spec_hash()
    np.testing.assert_array_equal(again.matrix_raw(_raw()), fitted.matrix_raw(_raw()))
    with pytest.raises(DataError, match="fingerprint"):
        FittedFeatures.from_dict(FRAUD_FEATURES, {**data, "spec_fingerprint": "0000"})


def test_generator_is_seeded_and_near_base_rate():
    a = generate_transactions(GenerateSpec(rows=20_000, seed=5))
    b = generate_transactions(GenerateSpec(rows=20_000, seed=5))
    assert a.equals(b)
    assert 0.01 <= a["is_fraud"].mean() <= 0.02
    shifted = generate_transactions(GenerateSpec(rows=20_000, seed=5, drift=1.0))
    assert shifted["amount"].median() > 1.5 * a["amount"].median()


def test_training_reports_what_the_history_features_are_worth():
    raw = generate_transactions(GenerateSpec(rows=30_000, seed=3))
    with_history = train_model(raw.lazy(), FRAUD_FEATURES, "is_fraud", TrainParams(num_boost_round=60))
    m = with_history.metrics
    assert 0.5 < m["roc_auc_without_history"] < m["roc_auc"]  # the generator's signal is in the history
    plain = train_model(raw.select("amount", "is_fraud").lazy(), columns_spec(raw.select("amount").schema),
                        "is_fraud", TrainParams(num_boost_round=20))
    assert "roc_auc_without_history" not in plain.metrics  # nothing to compare without history features


def test_generator_bursts_and_later_periods():
    raw = generate_transactions(GenerateSpec(rows=20_000, seed=5))
    f = FRAUD_FEATURES.compute(raw.lazy()).collect()
    assert (f["card_txn_count_1h"] >= 3).sum() > 100  # compromised cards: several transactions within the hour
    later = generate_transactions(GenerateSpec(rows=1_000, seed=6, start=dt.datetime(2026, 4, 1), span_days=7))
    assert later["timestamp"].min() >= dt.datetime(2026, 4, 1) and later["timestamp"].max() < dt.datetime(2026, 4, 8)
