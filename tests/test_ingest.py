"""Bad data files fail with errors naming the file and the column."""

from __future__ import annotations

import polars as pl
import pytest

from training.errors import DataError
from training.features import RAW_SCHEMA
from training.generate import GenerateSpec, generate_transactions
from training.ingest import SNIFF_BYTES, load_raw, scan_table


@pytest.fixture()
def frame() -> pl.DataFrame:
    return generate_transactions(GenerateSpec(rows=200, seed=1))


def test_csv_and_parquet_load_the_same(tmp_path, frame):
    frame.write_csv(tmp_path / "t.csv")
    frame.write_parquet(tmp_path / "t.parquet")
    a = load_raw(tmp_path / "t.csv", RAW_SCHEMA, ("is_fraud",)).collect()
    b = load_raw(tmp_path / "t.parquet", RAW_SCHEMA, ("is_fraud",)).collect()
    assert dict(a.select(*RAW_SCHEMA).schema) == dict(b.select(*RAW_SCHEMA).schema) == RAW_SCHEMA
    assert a.select(*RAW_SCHEMA).equals(b.select(*RAW_SCHEMA))
    assert a["is_fraud"].to_list() == b["is_fraud"].to_list()


@pytest.mark.parametrize("name", ["data.csv", "data.parquet"])
def test_binary_file_is_not_a_csv_or_parquet_file(tmp_path, name):
    """An executable named .csv used to become its bytes as column names; a .parquet one a reader error."""
    path = tmp_path / name
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    with pytest.raises(DataError, match=f"^not a CSV/Parquet file: {path} "):
        load_raw(path, RAW_SCHEMA)


def test_utf8_csv_cut_inside_a_character_at_the_sniffed_length_is_text(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a\nx" + "é" * 40_000 + "\n", encoding="utf-8")  # 2-byte chars start at odd offsets
    assert path.read_bytes()[SNIFF_BYTES - 1] == "é".encode()[0]  # the sniffed bytes end inside a character
    assert scan_table(path).collect().height == 1


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_raw(tmp_path / "nope.parquet", RAW_SCHEMA)


def test_empty_file(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="e.csv is empty"):
        load_raw(tmp_path / "e.csv", RAW_SCHEMA)


def test_header_only(tmp_path, frame):
    frame.head(0).write_csv(tmp_path / "h.csv")
    with pytest.raises(DataError, match="no rows"):
        load_raw(tmp_path / "h.csv", RAW_SCHEMA)


def test_wrong_file_type(tmp_path):
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(DataError, match="expected a .csv or .parquet"):
        load_raw(tmp_path / "t.json", RAW_SCHEMA)


def test_missing_column_named(tmp_path, frame):
    frame.drop("amount").write_parquet(tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m.parquet lacks required column\(s\) \['amount'\]"):
        load_raw(tmp_path / "m.parquet", RAW_SCHEMA)


def test_non_numeric_amount_names_row_and_value(tmp_path, frame):
    bad = frame.with_columns(pl.col("amount").cast(pl.String))
    bad = bad.with_columns(pl.when(pl.int_range(pl.len()) == 41).then(pl.lit("12,50 EUR")).otherwise("amount").alias("amount"))
    bad.write_csv(tmp_path / "b.csv")
    with pytest.raises(DataError, match=r"b.csv: column 'amount' must be numeric .* row 42 holds '12,50 EUR'"):
        load_raw(tmp_path / "b.csv", RAW_SCHEMA)


def test_unparseable_timestamp(tmp_path, frame):
    bad = frame.with_columns(pl.col("timestamp").cast(pl.String))
    bad = bad.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("yesterday")).otherwise("timestamp").alias("timestamp"))
    bad.write_csv(tmp_path / "ts.csv")
    with pytest.raises(DataError, match="'timestamp' has 1 missing or unparseable"):
        load_raw(tmp_path / "ts.csv", RAW_SCHEMA)
