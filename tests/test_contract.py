"""The data contract: every broken rule of a raw file is reported at once, with counts and row numbers."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest

from training.contract import (
    Contract,
    Rule,
    Severity,
    enforce,
    fraud_contract,
    validate,
    validate_file,
)
from training.errors import ContractViolationError, DataError
from training.generate import GenerateSpec, generate_transactions

NOW = dt.datetime(2026, 6, 1)
FORMATS = ["csv", "parquet"]


@pytest.fixture(scope="module")
def clean() -> pl.DataFrame:
    return generate_transactions(GenerateSpec(rows=300, seed=5))


def _write(frame: pl.DataFrame, path: Path) -> Path:
    frame.write_csv(path) if path.suffix == ".csv" else frame.write_parquet(path)
    return path


def _at(rows: list[int], value: object, column: str) -> pl.Expr:
    """`value` at the given 1-based rows of `column`, the column unchanged elsewhere."""
    return pl.when((pl.int_range(pl.len()) + 1).is_in(rows)).then(pl.lit(value)).otherwise(pl.col(column)).alias(column)


def _found(report) -> dict[tuple[str, str], tuple[int, list[int]]]:
    return {(v.column, v.rule): (v.failing_rows, [e["row"] for e in v.examples]) for v in report.violations}


@pytest.mark.parametrize("fmt", FORMATS)
def test_clean_generated_data_passes(tmp_path, clean, fmt):
    report = validate_file(_write(clean, tmp_path / f"clean.{fmt}"), fraud_contract(now=NOW))
    assert report.passed, report.render()
    assert report.violations == ()
    assert report.rows == clean.height


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_problem_is_reported_at_once(tmp_path, clean, fmt):
    broken = (
        clean.with_columns(
            _at([3, 10], -5.0, "amount"),
            _at([4], None, "card_id"),
            _at([9], 1, "transaction_id"),  # repeats row 1's id
            _at([6, 11, 12, 13, 14, 15, 16], "fax", "channel"),  # more than the 5 examples kept
            _at([7], dt.datetime(1990, 5, 1), "timestamp"),
        )
        .with_columns(pl.col("amount").cast(pl.String))
        .with_columns(_at([8], "12,50 EUR", "amount"))
        .drop("country")
    )
    path = _write(broken, tmp_path / f"broken.{fmt}")

    report = validate_file(path, fraud_contract(now=NOW))

    assert not report.passed
    assert _found(report) == {
        ("amount", "range"): (2, [3, 10]),
        ("amount", "dtype"): (1, [8]),
        ("card_id", "not_null"): (1, [4]),
        ("transaction_id", "unique"): (1, [9]),
        ("channel", "allowed"): (7, [6, 11, 12, 13, 14]),
        ("timestamp", "range"): (1, [7]),
        ("country", "present"): (clean.height, []),
    }
    by_rule = {(v.column, v.rule): v for v in report.violations}
    assert by_rule[("amount", "dtype")].examples == [{"row": 8, "amount": "12,50 EUR"}]
    assert by_rule[("amount", "range")].examples[0] == {"row": 3, "amount": "-5.0"}
    assert by_rule[("transaction_id", "unique")].examples == [{"row": 9, "transaction_id": "1"}]
    assert by_rule[("timestamp", "range")].examples[0]["timestamp"].startswith("1990-05-01")
    assert all(v.severity is Severity.ERROR for v in report.violations)
    json.dumps(report.to_dict(), allow_nan=False)  # JSON-safe
    table = report.render()
    assert "channel" in table and "6: fax" in table and "8: 12,50 EUR" in table


def test_text_value_after_the_csv_inference_window_is_reported_not_fatal(tmp_path):
    frame = generate_transactions(GenerateSpec(rows=20_500, seed=2))
    frame = frame.with_columns(pl.col("amount").cast(pl.String)).with_columns(_at([20_001], "abc", "amount"))
    report = validate_file(_write(frame, tmp_path / "late.csv"), fraud_contract(now=NOW))
    assert _found(report) == {("amount", "dtype"): (1, [20_001])}


def test_fractional_ids_and_unconvertible_types_are_dtype_violations(tmp_path, clean):
    frame = clean.head(5).with_columns(
        pl.col("card_id").cast(pl.Float64).alias("card_id"),
        pl.lit(True).alias("timestamp"),
    ).with_columns(_at([2], 1.5, "card_id"))
    report = validate_file(_write(frame, tmp_path / "types.parquet"), fraud_contract(now=NOW))
    assert _found(report) == {("card_id", "dtype"): (1, [2]), ("timestamp", "dtype"): (5, [1, 2, 3, 4, 5])}


def test_header_only_file_breaks_min_rows(tmp_path, clean):
    report = validate_file(_write(clean.head(0), tmp_path / "empty.csv"), fraud_contract(now=NOW))
    assert _found(report) == {("*", "min_rows"): (0, [])}
    assert not report.passed


def test_unseen_categories_follow_the_rule_severity(tmp_path, clean):
    path = _write(clean.with_columns(_at([2, 5], "XX", "country")), tmp_path / "unseen.parquet")

    training = validate_file(path, fraud_contract(now=NOW))
    assert not training.passed
    with pytest.raises(ContractViolationError):
        enforce(training)

    scoring = validate_file(path, fraud_contract(now=NOW, category_severity=Severity.WARNING))
    assert scoring.passed
    assert [(v.column, v.rule, v.failing_rows) for v in scoring.warnings] == [("country", "allowed", 2)]
    assert scoring.errors == ()
    assert enforce(scoring) is scoring
    assert scoring.to_dict()["violations"][0]["severity"] == "warning"


def test_custom_contract_with_warning_and_error_rules():
    contract = Contract(
        name="tiny",
        schema={"x": pl.Int64()},
        rules=(
            Rule("x", "small", pl.col("x") > 10, "<= 10", Severity.WARNING),
            Rule("x", "positive", pl.col("x") <= 0, "> 0"),
        ),
    )
    lf = pl.LazyFrame({"x": [1, 20, 3]})
    report = validate(lf, contract, "memory")
    assert report.passed and _found(report) == {("x", "small"): (1, [2])}
    report = validate(pl.LazyFrame({"x": [1, 20, -3]}), contract, "memory")
    assert not report.passed and _found(report) == {("x", "small"): (1, [2]), ("x", "positive"): (1, [3])}


def test_violation_error_names_the_file_columns_and_rules(tmp_path, clean):
    broken = clean.with_columns(_at([3], -1.0, "amount"), _at([4], "fax", "channel"))
    path = _write(broken, tmp_path / "named.csv")
    with pytest.raises(ContractViolationError) as info:
        enforce(validate_file(path, fraud_contract(now=NOW)))
    message = str(info.value)
    assert str(path) in message
    assert "amount range" in message and "channel allowed" in message
    assert isinstance(info.value, DataError)
    assert info.value.report.source == str(path)


def test_refused_report_is_saved_and_named_in_the_error(tmp_path, clean):
    path = _write(clean.with_columns(_at([2], -3.0, "amount")), tmp_path / "refused.parquet")
    with pytest.raises(ContractViolationError) as info:
        enforce(validate_file(path, fraud_contract(now=NOW)), tmp_path / "reports")
    saved = info.value.saved
    assert saved is not None and str(saved) in str(info.value)
    data = json.loads(saved.read_text())
    assert data["source"] == str(path) and data["passed"] is False
    assert [(v["column"], v["rule"], v["failing_rows"], v["examples"]) for v in data["violations"]] == [
        ("amount", "range", 1, [{"row": 2, "amount": "-3.0"}])
    ]


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        validate_file(tmp_path / "nope.parquet", fraud_contract())


def test_a_row_breaking_a_rule_and_uniqueness_shows_both(tmp_path, clean):
    frame = clean.with_columns(_at([6], 1, "transaction_id")).with_columns(_at([6], -2.0, "amount"))
    report = validate_file(_write(frame, tmp_path / "both.parquet"), fraud_contract(now=NOW))
    by_rule = {(v.column, v.rule): v.examples for v in report.violations}
    assert by_rule == {
        ("transaction_id", "unique"): [{"row": 6, "transaction_id": "1"}],
        ("amount", "range"): [{"row": 6, "amount": "-2.0"}],
    }
