"""Feature-row files (.npy, float32, rows x features) that the Locust users replay."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from loadtest.errors import RowsFileError

log = logging.getLogger(__name__)


def write_sample_rows(matrix: np.ndarray, path: Path) -> Path:
    """Save a feature matrix (rows x features, model feature order) as float32 `.npy`; returns the path."""
    x = np.asarray(matrix, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise RowsFileError(f"expected a non-empty 2-D feature matrix (rows x features), got shape {x.shape}")
    path = Path(path)
    if path.suffix != ".npy":
        raise RowsFileError(f"{path}: row files must end in .npy (numpy would append it silently)")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(x))
    log.info("wrote %d rows x %d features to %s", x.shape[0], x.shape[1], path)
    return path


def load_rows(path: Path, mmap: bool = False) -> np.ndarray:
    """Read and check a row file; `mmap=True` only maps it (enough to check the shape)."""
    path = Path(path)
    try:
        x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise RowsFileError(f"row file {path} does not exist; write one with loadtest.rows.write_sample_rows") from None
    except (OSError, ValueError) as exc:
        raise RowsFileError(f"cannot read row file {path}: {exc}; rewrite it with write_sample_rows") from exc
    if x.ndim != 2 or x.shape[0] == 0 or x.dtype != np.float32:
        raise RowsFileError(
            f"row file {path} holds {x.dtype} with shape {x.shape}; expected non-empty float32 rows x features "
            "(rewrite it with write_sample_rows)"
        )
    return x
