"""ONNX run by ONNX Runtime inside Triton's Python backend (runs on the pip wheel's Triton)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import xgboost as xgb
from tritonclient.grpc import model_config_pb2 as mc

import backends
from export.targets.onnx_file import OnnxFileTarget
from export.triton_config import ServingSettings, TensorSpec, model_config
from training.features import FittedFeatures

#: Runs inside Triton (imports triton_python_backend_utils), so it is copied, never imported.
TRITON_MODEL_SOURCE = Path(backends.__file__).resolve().with_name("python_model.py")


class PythonOnnxTarget(OnnxFileTarget):
    """`model.onnx` plus the `model.py` that serves it; `backend: "python"`."""

    name = "python-onnx"

    def write_artifacts(
        self, booster: xgb.Booster, n_features: int, version_dir: Path, raw_features: FittedFeatures | None = None
    ) -> None:
        super().write_artifacts(booster, n_features, version_dir, raw_features)
        shutil.copyfile(TRITON_MODEL_SOURCE, version_dir / "model.py")

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
        return model_config(
            model_name,
            backend="python",
            inputs=inputs or [TensorSpec(self.input_name, (n_features,))],
            outputs=[TensorSpec(self.output_name, (n_outputs,))],
            serving=serving,
            versions=versions,
            parameters={"ort_intra_op_threads": "1", **parameters},
        )
