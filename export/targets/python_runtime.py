"""The files of a Python-backend version folder: `model.py` and the modules it imports from beside it.

They run inside Triton's stub process, so they are copied from backends/, never imported by treeops.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import backends

BACKENDS = Path(backends.__file__).resolve().parent
#: Feature tensors or client-supplied raw fields, scored with ONNX Runtime or a compiled forest.
FEATURE_MODEL = BACKENDS / "python_model.py"
#: Raw transactions: history features from the online store, then the raw graph (backends/online_model.py).
ONLINE_MODEL = BACKENDS / "online_model.py"
#: Imported by every model.py: the treeops.json file-manifest check, the serving metrics and the prediction log.
SHARED_MODULES = ("version_files.py", "serving_monitor.py", "prediction_log.py")
#: Imported by the online model: the store's read-and-update of history features.
ONLINE_MODULES = ("online_history.py",)


def write_python_runtime(version_dir: Path, model_source: Path, modules: tuple[str, ...] = ()) -> None:
    """Copy `model_source` as `model.py`, plus the shared modules and `modules`, into `version_dir`."""
    shutil.copyfile(model_source, version_dir / "model.py")
    for name in (*SHARED_MODULES, *modules):
        shutil.copyfile(BACKENDS / name, version_dir / name)
