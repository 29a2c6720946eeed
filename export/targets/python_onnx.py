"""ONNX run by ONNX Runtime inside Triton's Python backend (runs on the pip wheel's Triton)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import xgboost as xgb
from tritonclient.grpc import model_config_pb2 as mc

from export.onnx_convert import file_scorer
from export.parity import Scorer
from export.raw_graph import raw_file_scorer, serving_graph
from export.targets.base import ExportTarget
from export.triton_config import ServingSettings, TensorSpec, model_config
from training.features import FittedFeatures

ONNX_FILE = "model.onnx"
#: Runs inside Triton (imports triton_python_backend_utils), so it is copied, never imported.
TRITON_MODEL_SOURCE = Path(__file__).resolve().parents[1] / "triton_python_model.py"


class PythonOnnxTarget(ExportTarget):
    """`model.onnx` plus the `model.py` that serves it; `backend: "python"`."""

    name = "python-onnx"

    supports_raw_inputs = True

    def write_artifacts(
        self, booster: xgb.Booster, n_features: int, version_dir: Path, raw_features: FittedFeatures | None = None
    ) -> None:
        onnx.save_model(serving_graph(booster, n_features, raw_features), version_dir / ONNX_FILE)
        shutil.copyfile(TRITON_MODEL_SOURCE, version_dir / "model.py")

    def scorer(self, version_dir: Path) -> Scorer:
        return file_scorer(version_dir / ONNX_FILE)

    def raw_scorer(self, version_dir: Path) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
        return raw_file_scorer(version_dir / ONNX_FILE)

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
