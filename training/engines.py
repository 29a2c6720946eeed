"""The training engines `treeops train` and `treeops bench training` choose from."""

from __future__ import annotations

from training.errors import SettingsError

#: `single`: one process (the default); `dask`: a Parquet dataset on a Dask cluster.
ENGINES = ("single", "dask")


def check_engine(engine: str) -> str:
    """`engine` if it is one of ENGINES; otherwise a SettingsError listing them."""
    if engine not in ENGINES:
        raise SettingsError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    return engine
