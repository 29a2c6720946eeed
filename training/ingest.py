"""Lazy ingest of CSV or Parquet transaction files, with checks that name the file and column."""

from __future__ import annotations

import codecs
import logging
from collections.abc import Mapping
from pathlib import Path

import polars as pl

from training.errors import DataError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".csv", ".parquet")
PARQUET_MAGIC = b"PAR1"
#: Bytes of a CSV file checked for text: a binary file would otherwise become column names.
SNIFF_BYTES = 64 * 1024


def scan_table(path: Path | str) -> pl.LazyFrame:
    """Open a CSV or Parquet file (local, or `s3://` through Polars' object store) lazily; fail clearly."""
    if str(path).startswith("s3://"):
        return _scan_remote(str(path))
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; generate one with `treeops generate --out {path}`")
    if path.is_dir() or path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(f"data file {path}: expected a {' or '.join(SUPPORTED_SUFFIXES)} file")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    _require_format(path)
    try:
        if path.suffix.lower() == ".csv":
            lf = pl.scan_csv(path, infer_schema_length=10_000)
        else:
            lf = pl.scan_parquet(path)
        lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"data file {path} cannot be read: {exc}") from exc
    return lf


def _require_format(path: Path) -> None:
    """A .parquet file starts with Parquet's magic bytes; a .csv file's first bytes are UTF-8 text without NUL."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    parquet = path.suffix.lower() == ".parquet"
    if parquet:
        ok = head.startswith(PARQUET_MAGIC)
    else:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut multi-byte tail is fine
            ok = b"\x00" not in head
        except UnicodeDecodeError:
            ok = False
    if not ok:
        what = "Parquet" if parquet else "UTF-8 text"
        raise DataError(f"not a CSV/Parquet file: {path} (its first bytes are not {what}); "
                        "give a UTF-8 CSV with a header row or a Parquet file")


def _scan_remote(url: str) -> pl.LazyFrame:
    suffix = Path(url).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"data file {url}: expected a {' or '.join(SUPPORTED_SUFFIXES)} file")
    try:
        lf = pl.scan_csv(url) if suffix == ".csv" else pl.scan_parquet(url)
        lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(
            f"cannot read {url}: {exc}; check the bucket and key, and the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            "AWS_REGION (or AWS_ENDPOINT_URL) environment variables"
        ) from exc
    return lf


def load_raw(path: Path | str, schema: Mapping[str, pl.DataType], extra: tuple[str, ...] = ()) -> pl.LazyFrame:
    """Scan `path` and cast it to `schema` (+ `extra` columns kept as they are).

    Raises DataError naming the file and column when a column is missing, a numeric column
    holds text, or a timestamp does not parse; an empty table is refused too.
    """
    lf = scan_table(path)
    have = lf.collect_schema()
    missing = [c for c in (*schema, *extra) if c not in have]
    if missing:
        raise DataError(f"data file {path} lacks required column(s) {missing}; it has {list(have)}")
    casts = []
    for name, dtype in schema.items():
        src = have[name]
        if dtype.is_numeric() and not src.is_numeric():
            bad = first_unparseable(lf, name, dtype)
            if bad is not None:
                raise DataError(
                    f"data file {path}: column {name!r} must be numeric ({dtype}), "
                    f"but row {bad[0]} holds {bad[1]!r}"
                )
            casts.append(pl.col(name).cast(dtype))
        elif isinstance(dtype, pl.Datetime) and src == pl.String:
            casts.append(pl.col(name).str.to_datetime(time_unit=dtype.time_unit, strict=False).alias(name))
        else:
            casts.append(pl.col(name).cast(dtype))
    lf = lf.with_columns(casts)
    stats = lf.select(pl.len().alias("rows"), *_null_timestamps(schema, have)).collect()
    if stats["rows"][0] == 0:
        raise DataError(f"data file {path} has a header but no rows")
    for name in (c for c in stats.columns if c != "rows"):
        if stats[name][0]:
            raise DataError(f"data file {path}: column {name!r} has {stats[name][0]} missing or unparseable timestamps")
    return lf.select(*schema, *extra)


def first_unparseable(lf: pl.LazyFrame, name: str, dtype: pl.DataType) -> tuple[int, str] | None:
    row = (
        lf.with_row_index("_row")
        .filter(pl.col(name).is_not_null() & pl.col(name).cast(dtype, strict=False).is_null())
        .select("_row", pl.col(name).cast(pl.String))
        .head(1)
        .collect()
    )
    return None if row.is_empty() else (int(row["_row"][0]) + 1, row[name][0])


def _null_timestamps(schema: Mapping[str, pl.DataType], have: pl.Schema) -> list[pl.Expr]:
    return [pl.col(n).null_count().alias(n) for n, d in schema.items() if isinstance(d, pl.Datetime)]
