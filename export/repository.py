"""The Triton model repository on disk: atomic version folders and config files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from export.errors import RepositoryError
from export.triton_config import render

log = logging.getLogger(__name__)

METADATA_FILE = "treeops.json"
FEATURES_FILE = "feature_spec.json"
PARITY_FILE = "parity.json"
CONFIG_FILE = "config.pbtxt"


class ModelRepository:
    """A folder laid out as Triton expects: `<root>/<model>/config.pbtxt` and `<root>/<model>/<N>/`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(version)

    def versions(self, name: str) -> list[int]:
        """Complete version folders of `name` (staging folders are not versions)."""
        folder = self.model_dir(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def metadata(self, name: str, version: int) -> dict[str, Any]:
        path = self.version_dir(name, version) / METADATA_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"{path} is missing or unreadable: {exc}; re-export version {version}") from exc

    @contextlib.contextmanager
    def stage_version(self, name: str, version: int) -> Iterator[Path]:
        """Yield an empty staging folder; on success it is renamed to `<name>/<version>` at once.

        Triton ignores non-numeric folders, so a half-written staging folder is never loaded, and
        a failure removes it: a version folder either is complete or does not exist.
        """
        final = self.version_dir(name, version)
        if final.exists():
            raise RepositoryError(f"{final} already exists; versions are immutable (delete it to re-export)")
        staging = self.model_dir(name) / f".staging-{version}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir(parents=True)
        except OSError as exc:
            raise RepositoryError(f"cannot write to model repository {self.root}: {exc}") from exc
        try:
            yield staging
            _fsync_tree(staging)
            os.rename(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("wrote %s", final)

    def write_config(self, cfg: mc.ModelConfig) -> Path:
        """Write `<model>/config.pbtxt` atomically (temp file + rename)."""
        path = self.model_dir(cfg.name) / CONFIG_FILE
        _atomic_write(path, render(cfg))
        return path

    def restore_config(self, name: str, text: str) -> None:
        """Put back a config text saved earlier (after a failed rollout); empty text removes the config."""
        path = self.model_dir(name) / CONFIG_FILE
        if text:
            _atomic_write(path, text)
        else:
            path.unlink(missing_ok=True)

    def read_config(self, name: str) -> str | None:
        path = self.model_dir(name) / CONFIG_FILE
        return path.read_text() if path.exists() else None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temp file renamed into place."""
    _atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise RepositoryError(f"cannot write {path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
