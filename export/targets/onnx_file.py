"""What the ONNX-based targets share: one `model.onnx` (feature or raw-input graph) and its scorers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import xgboost as xgb

from export.onnx_convert import file_scorer
from export.parity import Scorer
from export.raw_graph import raw_file_scorer, serving_graph
from export.targets.base import ExportTarget
from training.features import FittedFeatures

ONNX_FILE = "model.onnx"


class OnnxFileTarget(ExportTarget):
    """Writes `model.onnx`; parity runs on that file with ONNX Runtime in-process."""

    supports_raw_inputs = True

    def write_artifacts(
        self, booster: xgb.Booster, n_features: int, version_dir: Path, raw_features: FittedFeatures | None = None
    ) -> None:
        onnx.save_model(serving_graph(booster, n_features, raw_features), version_dir / ONNX_FILE)

    def scorer(self, version_dir: Path) -> Scorer:
        return file_scorer(version_dir / ONNX_FILE)

    def raw_scorer(self, version_dir: Path) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
        return raw_file_scorer(version_dir / ONNX_FILE)
