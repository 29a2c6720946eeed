"""Export targets, one module each, chosen by name from `TARGETS`."""

from __future__ import annotations

from export.errors import SettingsError
from export.targets.base import ExportTarget
from export.targets.fil import FilTarget
from export.targets.native_compiled import NativeCompiledTarget
from export.targets.onnxruntime import OnnxRuntimeTarget
from export.targets.python_compiled import PythonCompiledTarget
from export.targets.python_onnx import PythonOnnxTarget

TARGETS: dict[str, type[ExportTarget]] = {
    PythonOnnxTarget.name: PythonOnnxTarget,
    OnnxRuntimeTarget.name: OnnxRuntimeTarget,
    FilTarget.name: FilTarget,
    PythonCompiledTarget.name: PythonCompiledTarget,
    NativeCompiledTarget.name: NativeCompiledTarget,
}


def get_target(name: str) -> ExportTarget:
    """Instantiate the target called `name`; unknown names list the valid ones."""
    try:
        return TARGETS[name]()
    except KeyError:
        raise SettingsError(f"unknown export target {name!r}; choose one of {sorted(TARGETS)}") from None
