"""The `treeops_forest` Triton backend: `backends/treeops_forest.c` built into a version folder.

Triton looks for `libtriton_<backend>.so` in the model's version folder before its backend
directory, so each version carries the backend it was exported and tested with; the library
loads the version's `forest.so` (export/compiled_forest.py) and scores requests in the server
process: no Python, no inter-process hop in the request path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import backends
from export.compiled_forest import require_compiler, run_compiler

BACKEND_NAME = "treeops_forest"
BACKEND_LIBRARY = f"libtriton_{BACKEND_NAME}.so"
BACKEND_SOURCE = Path(backends.__file__).resolve().with_name("treeops_forest.c")


#: Warnings are errors; only the TRITONBACKEND_* entry points are exported.
COMPILE_FLAGS = ("-O2", "-fPIC", "-shared", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden")


def build_backend(out_dir: Path, *, cc: str = "gcc", defines: Mapping[str, str] | None = None) -> Path:
    """Compile the backend into `out_dir/libtriton_treeops_forest.so` (Triton's symbols resolve at load).

    `defines` become `-DNAME=VALUE` (e.g. TREEOPS_BACKEND_API_MINOR, the TRITONBACKEND API minor it requires).
    """
    require_compiler(cc)
    out = Path(out_dir) / BACKEND_LIBRARY
    macros = [f"-D{name}={value}" for name, value in (defines or {}).items()]
    run_compiler([cc, *COMPILE_FLAGS, *macros, "-o", str(out), str(BACKEND_SOURCE), "-ldl"])
    return out
