"""Request-row files (.npz, one array per model input, rows x dims) that the Locust users replay."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from loadtest.errors import RowsFileError

log = logging.getLogger(__name__)


def write_sample_rows(feeds: Mapping[str, np.ndarray], path: Path) -> Path:
    """Save model inputs by name (each rows x dims, equal rows; strings kept as text) as `.npz`; returns the path."""
    arrays = {name: np.asarray(v) for name, v in feeds.items()}
    rows = {len(v) if v.ndim else 0 for v in arrays.values()}
    if not arrays or len(rows) != 1 or 0 in rows or any(v.ndim < 2 or 0 in v.shape for v in arrays.values()):
        shapes = {name: v.shape for name, v in arrays.items()}
        raise RowsFileError(f"expected non-empty 2-D inputs (rows x dims) with the same rows, got shapes {shapes}")
    path = Path(path)
    if path.suffix != ".npz":
        raise RowsFileError(f"{path}: row files must end in .npz (numpy would append it silently)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Object (string) arrays would need pickle to load: keep them as fixed-width text.
    np.savez(path, **{name: v.astype(str) if v.dtype == object else v for name, v in arrays.items()})
    log.info("wrote %d rows of inputs %s to %s", rows.pop(), sorted(arrays), path)
    return path


def load_rows(path: Path) -> dict[str, np.ndarray]:
    """Read and check a row file: input name -> rows x dims."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            feeds = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise RowsFileError(f"row file {path} does not exist; write one with loadtest.rows.write_sample_rows") from None
    except (OSError, ValueError) as exc:
        raise RowsFileError(f"cannot read row file {path}: {exc}; rewrite it with write_sample_rows") from exc
    if not feeds or len({len(v) for v in feeds.values()}) != 1 or any(v.ndim < 2 or 0 in v.shape for v in feeds.values()):
        raise RowsFileError(f"row file {path} holds {({k: v.shape for k, v in feeds.items()})}; expected non-empty "
                            "inputs of rows x dims with the same rows (rewrite it with write_sample_rows)")
    return feeds
