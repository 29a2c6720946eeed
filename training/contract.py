"""The data contract for raw input: declared columns and types, null rules and value rules.

A `Contract` is a small declarative table: a schema (every column required, typed), the columns
that may be null, and `Rule`s, each one Polars expression that is True on violating rows.
`validate` evaluates all of them in one lazy query over the file and returns a `ContractReport`
that lists every failed rule with its failing-row count and a few example rows.
Only rules of severity `error` fail the report; `warning` rules are reported and let training go on.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

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
    columns not in `nullable` must have no nulls; `rules` check the values."""

    name: str
    schema: Mapping[str, pl.DataType]
    rules: tuple[Rule, ...] = ()
    nullable: frozenset[str] = frozenset()
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
                "errors": len(self.errors), "warnings": len(self.warnings),
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
        rules=(
            Rule("transaction_id", "positive", c("transaction_id") <= 0, "> 0"),
            Rule("transaction_id", "unique", c("transaction_id").is_duplicated() & c("transaction_id").is_not_null(),
                 "no two rows share a value"),
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
    """Check `lf` against `contract` in one lazy query; never raises for bad values, only for unreadable data."""
    start = dt.datetime.now()
    have = lf.collect_schema()
    missing = [c for c in contract.schema if c not in have]
    present = {c: d for c, d in contract.schema.items() if c in have}
    converted = {c: _convert(c, have[c], d) for c, d in present.items() if have[c] != d}

    checks: list[tuple[str, str, str, Severity, pl.Expr, list[str]]] = []
    for col, dtype in present.items():
        raw = f"{_RAW}{col}" if col in converted else col
        if col in converted:
            checks.append((col, "dtype", f"{dtype} (file has {have[col]})", Severity.ERROR,
                           pl.col(raw).is_not_null() & pl.col(col).is_null(), [raw]))
        if col not in contract.nullable:
            checks.append((col, "not_null", "no missing values", Severity.ERROR, pl.col(raw).is_null(), [raw]))
    for rule in contract.rules:
        needs = list(dict.fromkeys(rule.fails.meta.root_names()))
        if absent := [n for n in needs if n not in have]:
            log.debug("rule %s/%s skipped: column(s) %s missing", rule.column, rule.name, absent)
            continue
        checks.append((rule.column, rule.name, rule.expect, rule.severity, rule.fails.fill_null(False), needs))

    # One query: convert types, evaluate each rule once into a mask column, then aggregate counts and examples.
    frame = (
        lf.with_row_index(_INDEX, offset=1)
        .with_columns(pl.col(c).alias(f"{_RAW}{c}") for c in converted)
        .with_columns(expr.alias(c) for c, expr in converted.items())
        .with_columns(check[4].alias(f"{_MASK}{i}") for i, check in enumerate(checks))
    )
    aggs = [pl.len().alias("rows")]
    for i, (*_, cols) in enumerate(checks):
        mask = pl.col(f"{_MASK}{i}")
        first = [pl.col(n).filter(mask).head(EXAMPLES_PER_RULE) for n in (_INDEX, *cols)]  # filter before cast
        shown = pl.struct(first[0].alias(ROW), *(e.cast(pl.String).alias(n.removeprefix(_RAW)) for e, n in zip(first[1:], cols)))
        aggs += [mask.sum().alias(f"n{i}"), shown.implode().alias(f"x{i}")]
    try:
        result = frame.select(aggs).collect().row(0, named=True)
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"data file {source} cannot be read for validation: {exc}") from exc

    rows = int(result["rows"])
    violations: list[Violation] = []
    if rows < contract.min_rows:
        violations.append(Violation(TABLE, "min_rows", 0, [], f">= {contract.min_rows} rows, found {rows}"))
    violations += [Violation(c, "present", rows, [], "column exists") for c in missing]
    for i, (col, name, expect, severity, _, _) in enumerate(checks):
        if count := int(result[f"n{i}"]):
            violations.append(Violation(col, name, count, list(result[f"x{i}"]), expect, severity))
    order = {c: i for i, c in enumerate([TABLE, *contract.schema])}
    violations.sort(key=lambda v: order.get(v.column, len(order)))
    report = ContractReport(source, rows, tuple(violations), contract.name,
                            (dt.datetime.now() - start).total_seconds())
    log.info("%s: %d rows, %d error and %d warning rule(s) failed in %.2f s",
             source, rows, len(report.errors), len(report.warnings), report.seconds)
    return report


def validate_file(path: Path | str, contract: Contract) -> ContractReport:
    """Validate a CSV or Parquet file; CSV is read as text so a bad value anywhere is reported, not fatal."""
    path = Path(path)
    lf = scan_table(path)  # existence, type, emptiness and readability checks
    if path.suffix.lower() == ".csv":
        lf = pl.scan_csv(path, infer_schema=False)
    return validate(lf, contract, str(path))


def enforce(report: ContractReport) -> ContractReport:
    """Return `report` when it passed; raise ContractViolationError when an error rule failed."""
    if not report.passed:
        raise ContractViolationError(report)
    for v in report.warnings:
        log.warning("%s: %s %s (%s) fails on %d rows", report.source, v.column, v.rule, v.expect, v.failing_rows)
    return report


def _convert(name: str, src: pl.DataType, dst: pl.DataType) -> pl.Expr:
    """Expression turning column `name` of type `src` into `dst`; values that do not convert become null."""
    col = pl.col(name)
    if src == pl.String and isinstance(dst, pl.Datetime):
        return col.str.strip_chars().str.to_datetime(time_unit=dst.time_unit, strict=False)
    if src == pl.String and dst.is_numeric():
        return col.str.strip_chars().cast(dst, strict=False)
    try:  # a cast Polars refuses for these types (e.g. Boolean -> Datetime) fails every non-null value
        pl.DataFrame(schema={name: src}).select(col.cast(dst, strict=False))
    except pl.exceptions.PolarsError:
        return pl.lit(None, dtype=dst)
    return col.cast(dst, strict=False)


def _examples_text(v: Violation) -> str:
    parts = []
    for ex in v.examples:
        values = [str(val) for key, val in ex.items() if key != ROW]
        parts.append(f"{ex[ROW]}: {', '.join(values)}")
    return "; ".join(parts)
