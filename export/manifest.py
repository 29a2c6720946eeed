"""The file manifest of a version folder: each file's size and SHA-256, recorded in treeops.json at export.

What runs inside Triton checks it before it loads anything (backends/treeops_forest.c for the
native target, backends/python_model.py for the Python-backend targets), so a damaged version
file (a truncated forest.so) makes only that version UNAVAILABLE, with the file named, instead
of crashing tritonserver.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from export.repository import METADATA_FILE

#: The treeops.json key holding the manifest: {relative path: {"size": bytes, "sha256": hex}}.
MANIFEST_KEY = "files"


def file_manifest(folder: Path) -> dict[str, dict[str, int | str]]:
    """Size and SHA-256 of every file under `folder` except treeops.json itself and hidden temp files."""
    manifest: dict[str, dict[str, int | str]] = {}
    for path in sorted(Path(folder).rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if not path.is_file() or relative == METADATA_FILE or path.name.startswith("."):
            continue
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        manifest[relative] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return manifest
