"""The file check every Python-backend version runs first: copied as `version_files.py` beside `model.py`.

Runs inside Triton's stub process and imports only the standard library (no treeops).
"""

import hashlib
import json
import os


def verify_files(folder):
    """Refuse the version unless every file in treeops.json's "files" manifest (written at export) has its
    recorded size and SHA-256: checked before anything is loaded, so a damaged file fails this version
    with the file named (as backends/treeops_forest.c does for the native target)."""
    metadata = os.path.join(folder, "treeops.json")
    try:
        with open(metadata, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{metadata} has no readable \"files\" manifest ({exc!r}): re-export the version") from exc
    for name, want in files.items():
        path = os.path.join(folder, name)
        try:
            size = os.path.getsize(path)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as exc:
            raise ValueError(f"cannot read {path}, listed in treeops.json ({exc}): re-export or `treeops sync` "
                             "the version") from exc
        if size != want["size"]:
            raise ValueError(f"{path} has {size} bytes but treeops.json records {want['size']} (truncated or "
                             "replaced): re-export or `treeops sync` the version")
        if digest.hexdigest() != want["sha256"]:
            raise ValueError(f"{path} has SHA-256 {digest.hexdigest()} but treeops.json records {want['sha256']} "
                             "(the file changed after export): re-export or `treeops sync` the version")
