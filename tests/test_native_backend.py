"""The native backend library as built, and the file manifest it checks (no Triton here: see test_compiled_target)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from export.manifest import file_manifest
from export.native_backend import BACKEND_LIBRARY, COMPILE_FLAGS, build_backend
from export.repository import METADATA_FILE

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("nm") is None,
                                reason="needs a C compiler (gcc) and nm")

ENTRY_POINTS = {"TRITONBACKEND_Initialize", "TRITONBACKEND_ModelInitialize", "TRITONBACKEND_ModelFinalize",
                "TRITONBACKEND_ModelInstanceInitialize", "TRITONBACKEND_ModelInstanceFinalize",
                "TRITONBACKEND_ModelInstanceExecute"}


def _symbols(library, kind: str) -> set[str]:
    out = subprocess.run(["nm", "-D", kind, str(library)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_backend_builds_with_warnings_as_errors_and_exports_only_its_entry_points(tmp_path):
    assert {"-Wall", "-Wextra", "-Werror"} <= set(COMPILE_FLAGS)
    library = build_backend(tmp_path)
    assert library.name == BACKEND_LIBRARY
    exported = {s for s in _symbols(library, "--defined-only") if s.startswith("TRITON") or not s.startswith("_")}
    assert exported == ENTRY_POINTS, exported


def test_backend_never_deletes_a_response_it_sent(tmp_path):
    """TRITONBACKEND_ResponseSend takes the response over, failed or not: the library never calls ResponseDelete."""
    imported = _symbols(build_backend(tmp_path), "--undefined-only")
    assert "TRITONBACKEND_ResponseSend" in imported
    assert "TRITONBACKEND_ResponseDelete" not in imported


def test_file_manifest_records_every_file_but_the_metadata_itself(tmp_path):
    (tmp_path / "forest.so").write_bytes(b"\x7fELF" + bytes(range(256)) * 300)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.json").write_text("{}")
    (tmp_path / METADATA_FILE).write_text("{}")
    (tmp_path / ".treeops.json.1234.tmp").write_text("{}")
    manifest = file_manifest(tmp_path)
    assert set(manifest) == {"forest.so", "sub/a.json"}
    data = (tmp_path / "forest.so").read_bytes()
    assert manifest["forest.so"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
