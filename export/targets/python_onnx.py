"""ONNX run by ONNX Runtime inside Triton's Python backend (runs on the pip wheel's Triton).

With raw inputs and a spec with history features, the version is the raw-transaction model
(export/online.py): backends/online_model.py computes the history features from the online store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import xgboost as xgb
from tritonclient.grpc import model_config_pb2 as mc

from export.online import is_online, online_config
from export.serving_metrics import serving_metrics_parameter
from export.targets.onnx_file import OnnxFileTarget
from export.targets.python_runtime import FEATURE_MODEL, ONLINE_MODEL, ONLINE_MODULES, write_python_runtime
from export.triton_config import ServingSettings, TensorSpec, model_config
from training.features import FittedFeatures


class PythonOnnxTarget(OnnxFileTarget):
    """`model.onnx` plus the `model.py` that serves it; `backend: "python"`."""

    name = "python-onnx"
    supports_history = True

    def write_artifacts(
        self, booster: xgb.Booster, n_features: int, version_dir: Path, raw_features: FittedFeatures | None = None
    ) -> None:
        super().write_artifacts(booster, n_features, version_dir, raw_features)
        if is_online(raw_features):
            write_python_runtime(version_dir, ONLINE_MODEL, ONLINE_MODULES)
        else:
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
        outputs, serving = online_config(parameters, [TensorSpec(self.output_name, (n_outputs,))], serving)
        return model_config(
            model_name,
            backend="python",
            inputs=inputs or [TensorSpec(self.input_name, (n_features,))],
            outputs=outputs,
            serving=serving,
            versions=versions,
            parameters={"ort_intra_op_threads": "1", **serving_metrics_parameter(), **parameters},
        )
