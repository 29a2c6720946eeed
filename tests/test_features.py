"""The feature spec: deterministic under ties, engine-independent, unknown categories -> NaN."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from training.errors import DataError
from training.features import FRAUD_FEATURES, FittedFeatures
from training.generate import GenerateSpec, generate_transactions


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


def test_history_features_break_timestamp_ties_by_transaction_id():
    f = FRAUD_FEATURES.compute(_raw().lazy()).collect()
    by_id = dict(zip(_raw()["transaction_id"], f.iter_rows(named=True)))
    # card 1 order: id1 (22:30), id2 (23:30), id4 (23:30, tie broken by id), id5 (23:31:30)
    assert [by_id[i]["card_txn_index"] for i in (1, 2, 4, 5)] == [0, 1, 2, 3]
    assert by_id[2]["seconds_since_prev_card_txn"] == 3600
    assert by_id[4]["seconds_since_prev_card_txn"] == 0
    assert by_id[5]["seconds_since_prev_card_txn"] == 90
    assert by_id[1]["seconds_since_prev_card_txn"] is None
    assert by_id[4]["amount_to_card_mean"] == pytest.approx(40.0 / 15.0)
    assert by_id[3]["card_txn_index"] == 0


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
