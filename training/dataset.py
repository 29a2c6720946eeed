"""A partitioned Parquet dataset (folder, glob or file; local or `s3://`) read one entity partition at a time.

Rows are assigned to partitions by a hash of the entity key, so every row of one card lands in
one partition and history features need no state from other partitions. Every file's footer is
checked on the client (cheap: no rows are read); rows are only ever read inside a partition task.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from training.errors import DataError
from training.ingest import first_unparseable
from training.objectives import check_target_values

#: A fixed seed: the same key lands in the same partition in every process and every run.
_HASH_SEED = 11


@dataclass(frozen=True)
class ParquetDataset:
    """The files of one dataset and the columns a partition reads from them."""

    source: str
    files: tuple[str, ...]
    schema: Mapping[str, pl.DataType]  # the raw columns (cast to these types) plus the kept extra columns

    def count_rows(self) -> int:
        """Total rows, from the Parquet footers."""
        return int(pl.scan_parquet(list(self.files)).select(pl.len()).collect().item())

    def partition(self, key: str, index: int, partitions: int) -> pl.LazyFrame:
        """The rows whose `key` hashes to partition `index` of `partitions`, cast to the schema."""
        lf = pl.scan_parquet(list(self.files)).select(pl.col(c).cast(t) for c, t in self.schema.items())
        return lf.filter(partition_of(pl.col(key), partitions) == index)


def check_file_values(path: str, target: str, not_null: tuple[str, ...], shown: int = 10) -> None:
    """Refuse missing/NaN/infinite targets and missing `not_null` values in one file, naming the file and the
    first rows (1-based, in file order), as the one-process ingest does; reads only those columns."""
    lf = pl.scan_parquet(path)
    check_target_values(lf, target, path, shown)
    for name in not_null:
        rows = lf.select(pl.col(name)).with_row_index("_row").filter(pl.col(name).is_null()).collect()["_row"]
        if rows.len():
            first = ", ".join(str(r + 1) for r in rows.head(shown).to_list())
            more = f" and {rows.len() - shown} more" if rows.len() > shown else ""
            raise DataError(f"Parquet file {path}: column {name!r} has {rows.len()} missing value(s) "
                            f"(rows {first}{more}); the rows are ordered by it, so fill or drop those rows")


def partition_of(key: pl.Expr, partitions: int) -> pl.Expr:
    """The partition number of each row's entity key."""
    return (key.hash(seed=_HASH_SEED) % partitions).cast(pl.Int64)


def open_dataset(source: str, schema: Mapping[str, pl.DataType], entity_key: str) -> ParquetDataset:
    """List the Parquet files of `source` and check every footer: readable, required columns, castable types.

    `schema` holds the raw columns and their types (plus extra columns such as the target with the
    type they must have, or None to keep theirs); `entity_key` must be one of the raw columns.
    """
    files = list_files(source)
    first: dict[str, pl.DataType] | None = None
    for path in files:
        have = file_schema(path)
        missing = [c for c in dict.fromkeys((*schema, entity_key)) if c not in have]
        if missing:
            what = "entity key" if entity_key in missing else "required column(s)"
            raise DataError(f"Parquet file {path} lacks {what} {missing}; it has {list(have)}; "
                            "every file of the dataset needs the same columns")
        if first is None:
            first = dict(have)
            continue
        changed = [c for c in schema if have[c] != first[c]]
        if changed:
            c = changed[0]
            raise DataError(f"Parquet file {path}: column {c!r} is {have[c]}, but {files[0]} has {first[c]}; "
                            "every file of the dataset needs the same schema; rewrite the odd file")
    assert first is not None  # list_files refuses an empty dataset
    resolved = {c: (t if t is not None else first[c]) for c, t in schema.items()}
    for c, t in resolved.items():
        src = first[c]
        if t.is_numeric() and not (src.is_numeric() or src == pl.Boolean):
            raise DataError(f"Parquet file {files[0]}: column {c!r} must be numeric ({t}) but is {src}"
                            f"{_first_text(files, c, t)}; write it as a number")
        if t.is_temporal() and not src.is_temporal():
            raise DataError(f"Parquet file {files[0]}: column {c!r} must be a timestamp ({t}) but is {src}; "
                            "write it as a Parquet timestamp")
    return ParquetDataset(source, tuple(files), resolved)


def _first_text(files: list[str], column: str, dtype: pl.DataType) -> str:
    """`, and row R of FILE holds 'V'` for the first value (in file order) that is not a number; read on failure only."""
    for path in files:
        bad = first_unparseable(pl.scan_parquet(path), column, dtype)
        if bad is not None:
            return f", and row {bad[0]} of {path} holds {bad[1]!r}"
    return ""


def list_files(source: str) -> list[str]:
    if source.startswith("s3://"):
        # Polars expands s3 globs itself; the footer check below reads the schema through it.
        return [source]
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
    elif any(ch in source for ch in "*?["):
        files = sorted(glob.glob(source, recursive=True))
    elif path.exists():
        files = [source]
    else:
        raise DataError(f"dataset {source} does not exist; give a folder of Parquet files, a glob or one file")
    if not files:
        raise DataError(f"dataset {source} holds no .parquet files; write the partitions as Parquet")
    return files


def file_schema(path: str) -> pl.Schema:
    try:
        return pl.scan_parquet(path).collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"Parquet file {path} cannot be read ({first_line}); replace or remove the file") from exc
