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
from backends import prediction_log
from export.compiled_forest import require_compiler, run_compiler
from export.errors import ExportError
from export.serving_metrics import METRICS_PARAMETER
from monitoring.prediction_log import JOURNAL_FORMAT, JOURNAL_MAGIC

BACKEND_NAME = "treeops_forest"
BACKEND_LIBRARY = f"libtriton_{BACKEND_NAME}.so"
BACKEND_SOURCE = Path(backends.__file__).resolve().with_name("treeops_forest.c")
#: The backend talks to the online store (raw-transaction versions) with hiredis.
HIREDIS_HEADER = Path("/usr/include/hiredis/hiredis.h")


#: Warnings are errors; only the TRITONBACKEND_* entry points are exported.
COMPILE_FLAGS = ("-O2", "-fPIC", "-shared", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden")


def contract_defines() -> dict[str, str]:
    """The macros the backend is compiled with, so that its prediction log and metrics follow the one declaration
    of each: backends/prediction_log.py (variables, defaults, contract version), the journal format the reader
    (monitoring/prediction_log.py) reads, and the config parameter export/serving_metrics.py writes."""
    defaults = prediction_log.Settings({})
    return {
        "TREEOPS_LOG_DIR_ENV": _c_string(prediction_log.DIR_ENV),
        "TREEOPS_LOG_SAMPLE_RATE_ENV": _c_string(prediction_log.SAMPLE_RATE_ENV),
        "TREEOPS_LOG_MAX_BYTES_ENV": _c_string(prediction_log.MAX_BYTES_ENV),
        "TREEOPS_LOG_SAMPLE_RATE_DEFAULT": repr(float(defaults.sample_rate)),
        "TREEOPS_LOG_MAX_BYTES_DEFAULT": f"{int(defaults.max_bytes)}ll",
        "TREEOPS_LOG_CONTRACT": _c_string(prediction_log.SCHEMA_VERSION.decode()),
        "TREEOPS_JOURNAL_MAGIC": _c_string(JOURNAL_MAGIC.decode()),
        "TREEOPS_JOURNAL_FORMAT": f"{JOURNAL_FORMAT}u",
        "TREEOPS_METRICS_PARAMETER": _c_string(METRICS_PARAMETER),
    }


def _c_string(text: str) -> str:
    if not text.isascii() or any(c in text for c in '"\\\n'):
        raise ValueError(f"{text!r} cannot be a C string literal here: use plain ASCII")
    return f'"{text}"'


def build_backend(out_dir: Path, *, cc: str = "gcc", defines: Mapping[str, str] | None = None) -> Path:
    """Compile the backend into `out_dir/libtriton_treeops_forest.so` (Triton's symbols resolve at load).

    `defines` become `-DNAME=VALUE` beside `contract_defines()` (e.g. TREEOPS_BACKEND_API_MINOR, the
    TRITONBACKEND API minor it requires).
    """
    require_compiler(cc)
    require_hiredis()
    out = Path(out_dir) / BACKEND_LIBRARY
    macros = [f"-D{name}={value}" for name, value in {**contract_defines(), **(defines or {})}.items()]
    run_compiler([cc, *COMPILE_FLAGS, *macros, "-o", str(out), str(BACKEND_SOURCE), "-lhiredis", "-ldl"])
    return out


def require_hiredis(header: Path = HIREDIS_HEADER) -> None:
    """Fail early, with the fix, where hiredis (the backend's Redis client) is not installed."""
    if not header.is_file():
        raise ExportError(f"the native-compiled target's backend links hiredis: {header} is missing "
                          "(apt-get install libhiredis-dev)")
