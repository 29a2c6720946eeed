"""The data contract for raw input: declared columns and types, null rules and value rules.

A `Contract` is a small declarative table: a schema (every column required, typed), the columns
that may be null or must be unique, and `Rule`s, each one Polars expression that is True on
violating rows. `validate` checks them all in one streaming query and returns a `ContractReport`
listing every failed rule with its failing-row count and the first example rows (1-based).
Only rules of severity `error` fail the report; `warning` rules are reported and let training go on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl

from training.errors import ContractViolationError, DataError
from training.features import RAW_SCHEMA
from training.generate import CHANNELS, COUNTRIES, MERCHANT_CATEGORIES
from training.ingest import scan_table

log = logging.getLogger(__name__)

#: Key of the 1-based row number in every example (data rows; a CSV header is not counted).
ROW = "row"
EXAMPLES_PER_RULE = 5
TABLE = "*"  # column name used for table-level rules
_RAW = "__raw__"
_INDEX = "__row__"
_MASK = "__fails__"
_DUP = "__repeats__"


class Severity(StrEnum):
    """`error` rules stop training; `warning` rules are only reported."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Rule:
    """One value rule on typed columns: `fails` is True on violating rows (null results pass)."""

    column: str
    name: str
    fails: pl.Expr
    expect: str
    severity: Severity = Severity.ERROR


@dataclass(frozen=True)
class Contract:
    """Declared raw input: every `schema` column is required and must convert to its dtype;
    columns not in `nullable` must have no nulls, `unique` columns no repeated value; `rules` check values."""

    name: str
    schema: Mapping[str, pl.DataType]
    rules: tuple[Rule, ...] = ()
    nullable: frozenset[str] = frozenset()
    unique: tuple[str, ...] = ()
    min_rows: int = 1


@dataclass(frozen=True)
class Violation:
    """A failed rule: how many rows fail it and the first few, as {"row": n, column: value-as-text}."""

    column: str
    rule: str
    failing_rows: int
    examples: list[dict[str, Any]]
    expect: str = ""
    severity: Severity = Severity.ERROR

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "rule": self.rule, "severity": str(self.severity), "expect": self.expect,
                "failing_rows": self.failing_rows, "examples": self.examples}


@dataclass(frozen=True)
class ContractReport:
    """Outcome of `validate`: every failed rule of `contract` on `source`."""

    source: str
    rows: int
    violations: tuple[Violation, ...]
    contract: str = ""
    seconds: float = field(default=0.0, compare=False)

    @property
    def errors(self) -> tuple[Violation, ...]:
        return tuple(v for v in self.violations if v.severity is Severity.ERROR)

    @property
    def warnings(self) -> tuple[Violation, ...]:
        return tuple(v for v in self.violations if v.severity is Severity.WARNING)

    @property
    def passed(self) -> bool:
        """True when no error-level rule failed (warnings allowed)."""
        return not self.errors

    def summary(self) -> str:
        """One line naming the source, the verdict and each failed error rule."""
        verdict = "passed" if self.passed else "FAILED"
        text = (f"data file {self.source} {verdict} contract {self.contract!r} ({self.rows} rows; "
                f"{len(self.errors)} error rule(s), {len(self.warnings)} warning rule(s) failed)")
        if self.errors:
            text += ": " + "; ".join(f"{v.column} {v.rule} ({v.expect}): {v.failing_rows} rows" for v in self.errors)
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: example values are text."""
        return {"source": self.source, "contract": self.contract, "rows": self.rows, "passed": self.passed,
                "errors": len(self.errors), "warnings": len(self.warnings), "seconds": round(self.seconds, 3),
                "violations": [v.to_dict() for v in self.violations]}

    def render(self) -> str:
        """The summary line plus a table of violations with example rows."""
        head = ("severity", "column", "rule", "expect", "failing_rows", "examples (row: value)")
        body = [(str(v.severity), v.column, v.rule, v.expect, str(v.failing_rows), _examples_text(v))
                for v in self.violations]
        widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in (head, *body)]
        return "\n".join([self.summary(), *(lines if body else [])])


def fraud_contract(
    *, target: str = "is_fraud", category_severity: Severity = Severity.ERROR, now: dt.datetime | None = None
) -> Contract:
    """Contract for card-transaction training data (RAW_SCHEMA + a 0/1 `target`).

    Categories outside the generator's lists are errors for training; pass
    `category_severity=Severity.WARNING` for scoring batches, where unseen values encode as missing.
    """
    first, last = dt.datetime(2000, 1, 1), (now or dt.datetime.now()) + dt.timedelta(days=1)
    c = pl.col
    categories = {"merchant_category": MERCHANT_CATEGORIES, "country": COUNTRIES, "channel": CHANNELS}
    return Contract(
        name="card_transactions_v1",
        schema={**RAW_SCHEMA, target: pl.Int8()},
        unique=("transaction_id",),
        rules=(
            Rule("transaction_id", "positive", c("transaction_id") <= 0, "> 0"),
            Rule("card_id", "non_negative", c("card_id") < 0, ">= 0"),  # the generator's card ids start at 0
            Rule("timestamp", "range", ~c("timestamp").is_between(first, last),
                 f"{first:%Y-%m-%d} .. {last:%Y-%m-%d %H:%M}"),
            Rule("amount", "range", ~((c("amount") >= 0) & (c("amount") < 1e7)), ">= 0 and < 1e7"),
            *(Rule(col, "allowed", ~c(col).is_in(values), "one of " + ", ".join(values), category_severity)
              for col, values in categories.items()),
            Rule(target, "allowed", ~c(target).is_in([0, 1]), "0 or 1"),
        ),
    )


def validate(lf: pl.LazyFrame, contract: Contract, source: str) -> ContractReport:
    """Check `lf` against `contract`; bad values become violations, unreadable data raises DataError.

    One streaming query converts the columns, evaluates each rule once and aggregates failing
    counts, duplicate counts and the first failing row numbers. Only when something failed does
    a second read fetch the example values and the first repeated rows of unique columns.
    """
    start = time.perf_counter()
    try:
        have = lf.collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"data file {source} cannot be read for validation: {exc}") from exc
    missing = [c for c in contract.schema if c not in have]
    present = {c: d for c, d in contract.schema.items() if c in have}
    converted = {c: _convert(c, have[c], d) for c, d in present.items() if have[c] != d}
    unique = [c for c in contract.unique if c in present]

    checks: list[_Check] = []
    for col, dtype in present.items():
        raw = f"{_RAW}{col}" if col in converted else col
        if col in converted:
            checks.append(_Check(col, "dtype", f"converts to {dtype} (read as {have[col]})", Severity.ERROR,
                                 pl.col(raw).is_not_null() & pl.col(col).is_null(), (raw,)))
        if col not in contract.nullable:
            checks.append(_Check(col, "not_null", "no missing values", Severity.ERROR, pl.col(raw).is_null(), (raw,)))
    for rule in contract.rules:
        needs = tuple(dict.fromkeys(rule.fails.meta.root_names()))
        if absent := [n for n in needs if n not in have]:
            log.debug("rule %s/%s skipped: column(s) %s missing", rule.column, rule.name, absent)
            continue
        checks.append(_Check(rule.column, rule.name, rule.expect, rule.severity, rule.fails.fill_null(False), needs))

    typed = (
        lf.with_row_index(_INDEX, offset=1)
        .with_columns(pl.col(c).alias(f"{_RAW}{c}") for c in converted)
        .with_columns(expr.alias(c) for c, expr in converted.items())
    )
    masked = typed.with_columns(check.fails.alias(f"{_MASK}{i}") for i, check in enumerate(checks))
    aggs = [pl.len().alias("rows"), *(_repeats(c).alias(f"{_DUP}{c}") for c in unique)]
    for i in range(len(checks)):
        aggs += [pl.col(f"{_MASK}{i}").sum().alias(f"n{i}"), _first_rows(pl.col(f"{_MASK}{i}")).alias(f"x{i}")]
    result = _run_all([masked.select(aggs)], source)[0].row(0, named=True)

    failed = [(check, int(result[f"n{i}"]), result[f"x{i}"]) for i, check in enumerate(checks) if result[f"n{i}"]]
    repeated = [c for c in unique if result[f"{_DUP}{c}"]]
    shown = sorted({n for _, _, first in failed for n in first})
    columns = sorted({c for check, _, _ in failed for c in check.columns})
    # Example values, and the first repeated rows of unique columns, in one more (shared) read of the data.
    queries = [typed.filter(pl.col(_INDEX).is_in(shown)).select(_INDEX, *(pl.col(c).cast(pl.String) for c in columns))]
    queries += [typed.filter(pl.col(c).is_not_null() & ~pl.col(c).is_first_distinct())
                .select(_INDEX, pl.col(c).cast(pl.String)).head(EXAMPLES_PER_RULE) for c in repeated]
    found = _run_all(queries, source) if shown or repeated else [pl.DataFrame()]
    values = {row[_INDEX]: row for row in found[0].iter_rows(named=True)}
    for col, frame in zip(repeated, found[1:]):
        for row in frame.iter_rows(named=True):
            values.setdefault(row[_INDEX], {}).update(row)
        check = _Check(col, "unique", "no value repeats an earlier row", Severity.ERROR, pl.lit(False), (col,))
        failed.append((check, int(result[f"{_DUP}{col}"]), frame[_INDEX].to_list()))

    rows = int(result["rows"])
    violations = [Violation(c, "present", rows, [], "column exists") for c in missing]
    if rows < contract.min_rows:
        violations.append(Violation(TABLE, "min_rows", 0, [], f">= {contract.min_rows} rows, found {rows}"))
    for check, count, first in failed:
        examples = [{ROW: n, **{c.removeprefix(_RAW): values[n][c] for c in check.columns}} for n in first]
        violations.append(Violation(check.column, check.rule, count, examples, check.expect, check.severity))
    order = {c: i for i, c in enumerate([TABLE, *contract.schema])}
    violations.sort(key=lambda v: order.get(v.column, len(order)))
    report = ContractReport(source, rows, tuple(violations), contract.name, time.perf_counter() - start)
    log.info("%s: %d rows, %d error and %d warning rule(s) failed in %.2f s",
             source, rows, len(report.errors), len(report.warnings), report.seconds)
    return report


def validate_file(path: Path | str, contract: Contract) -> ContractReport:
    """Validate a CSV or Parquet file (local or s3://); CSV is read as text so that a bad value
    anywhere is reported as a violation instead of failing the CSV parser."""
    lf = scan_table(path)  # existence, suffix, emptiness and readability, with its clear errors
    if str(path).lower().endswith(".csv"):
        lf = pl.scan_csv(path, infer_schema=False)
    return validate(lf, contract, str(path))


def enforce(report: ContractReport, reports_dir: Path | None = None) -> ContractReport:
    """Return `report` when no error rule failed (logging its warnings); otherwise save it as JSON
    in `reports_dir` (when given) and raise ContractViolationError."""
    for v in report.warnings:
        log.warning("%s: %s %s (%s) fails on %d rows", report.source, v.column, v.rule, v.expect, v.failing_rows)
    if report.passed:
        return report
    saved = None
    if reports_dir is not None:
        reports_dir.mkdir(parents=True, exist_ok=True)
        saved = reports_dir / f"contract-violations-{Path(report.source).stem}.json"
        saved.write_text(json.dumps(report.to_dict(), indent=2))
    raise ContractViolationError(report, saved)


def _convert(name: str, src: pl.DataType, dst: pl.DataType) -> pl.Expr:
    """Expression turning column `name` of type `src` into `dst`; values that do not convert become null."""
    col = pl.col(name)
    if src == pl.String and isinstance(dst, pl.Datetime):
        return col.str.strip_chars().str.to_datetime(time_unit=dst.time_unit, strict=False)
    if src == pl.String and dst.is_numeric():
        return col.str.strip_chars().cast(dst, strict=False)
    if src.is_float() and dst.is_integer():  # a cast would truncate 1.5 to 1
        return pl.when(col == col.round()).then(col.cast(dst, strict=False))
    if (
        src == pl.Null
        or (src.is_numeric() and dst.is_numeric())
        or (isinstance(src, pl.Datetime | pl.Date) and isinstance(dst, pl.Datetime))
        or (isinstance(src, pl.Categorical | pl.Enum) and dst == pl.String)
    ):
        return col.cast(dst, strict=False)
    return pl.lit(None, dtype=dst)  # e.g. Boolean for a timestamp: Polars would cast it, the contract refuses it


class _Check(NamedTuple):
    column: str
    rule: str
    expect: str
    severity: Severity
    fails: pl.Expr
    columns: tuple[str, ...]  # shown in examples (raw text for dtype and null checks)


def _repeats(col: str) -> pl.Expr:
    """Rows whose non-null value already appeared in an earlier row (streams, unlike is_duplicated)."""
    return pl.col(col).count() - pl.col(col).drop_nulls().n_unique()


def _first_rows(mask: pl.Expr) -> pl.Expr:
    """Row numbers of the first failing rows (row numbers only: filtering text columns does not stream)."""
    return pl.col(_INDEX).filter(mask).head(EXAMPLES_PER_RULE).implode()


def _run_all(queries: list[pl.LazyFrame], source: str) -> list[pl.DataFrame]:
    try:
        return pl.collect_all(queries)
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"data file {source} cannot be read for validation: {exc}") from exc


def _examples_text(v: Violation) -> str:
    return "; ".join(f"{e[ROW]}: " + ", ".join(str(x) for k, x in e.items() if k != ROW) for e in v.examples)
