"""A tl2cgen-compiled forest (`forest.so`) run by model.py inside Triton's Python backend.

Faster than ONNX Runtime from 16 rows up (`treeops bench serving`: 256-row requests 167k vs 129k
rows/s here); needs tl2cgen and a C compiler at export time, and the repository becomes
specific to the exporting machine's architecture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export.targets.compiled_forest_target import CompiledForestTarget
from export.targets.python_onnx import PythonOnnxTarget
from export.targets.python_runtime import FEATURE_MODEL, write_python_runtime
from export.triton_config import ServingSettings, TensorSpec


class PythonCompiledTarget(CompiledForestTarget):
    """`forest.so` plus the `model.py` that calls it; `backend: "python"`, parameter `runtime: compiled`."""

    name = "python-compiled"

    def write_runtime(self, version_dir: Path) -> None:
        write_python_runtime(version_dir, FEATURE_MODEL)

    def model_config(
        self,
        model_name: str,
        n_features: int,
        n_outputs: int,
        serving: ServingSettings,
        versions: Sequence[int],
        parameters: Mapping[str, str],
        inputs: Sequence[TensorSpec] | None = None,
    ) -> mc.ModelConfig:
        self.require_feature_tensor(inputs)
        return PythonOnnxTarget().model_config(model_name, n_features, n_outputs, serving, versions,
                                               {**parameters, "runtime": "compiled"})
