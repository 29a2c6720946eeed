"""The one interface every export target implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import xgboost as xgb
from tritonclient.grpc import model_config_pb2 as mc

from export.errors import UnsupportedModelError
from export.booster import n_outputs as served_width
from export.online import is_online
from export.parity import Scorer
from export.signature import FEATURES_INPUT, SCORES_OUTPUT
from export.triton_config import ServingSettings, TensorSpec
from training.features import FittedFeatures


class ExportTarget(ABC):
    """Writes a version's artifacts, scores them in-process for parity, and describes the Triton config."""

    name: str
    #: Served tensor names of a feature-tensor model (clients read them from the model's signature).
    input_name: str = FEATURES_INPUT
    output_name: str = SCORES_OUTPUT
    #: Whether the target can serve the raw-input graph (`export/raw_graph.py`) instead of features.
    supports_raw_inputs: bool = False
    #: Whether it can serve a spec with history features from raw fields (the online store, export/online.py).
    supports_history: bool = False

    def n_outputs(self, booster: xgb.Booster) -> int:
        """Width of the served output: 2 (binary probabilities), num_class, or 1 (regression value)."""
        return served_width(booster)

    @abstractmethod
    def write_artifacts(
        self, booster: xgb.Booster, n_features: int, version_dir: Path, raw_features: FittedFeatures | None = None
    ) -> None:
        """Write the files Triton loads into `version_dir` (a staging folder); with `raw_features`, the
        model takes raw fields and computes the stateless features itself (only where supported)."""

    def require_feature_tensor(self, raw: object | None) -> None:
        """Refuse raw fields (`raw_features` or raw input specs) where the target does not serve them."""
        if raw is not None and not self.supports_raw_inputs:
            raise UnsupportedModelError(f"the {self.name} target serves one feature tensor; export raw inputs with "
                                        "--target python-onnx or onnxruntime")
        if isinstance(raw, FittedFeatures) and is_online(raw) and not self.supports_history:
            raise UnsupportedModelError(f"spec {raw.spec.name!r} has history features, which the {self.name} target "
                                        "cannot read from the online store; export raw inputs with --target python-onnx")

    def raw_scorer(self, version_dir: Path) -> Callable[[Mapping[str, np.ndarray]], np.ndarray] | None:
        """An in-process scorer of a written raw-input model (feeds by input name), where supported."""
        return None

    @abstractmethod
    def scorer(self, version_dir: Path) -> Scorer | None:
        """An in-process scorer of the written artifacts, or None where this machine cannot run them."""

    @abstractmethod
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
        """The model's config, serving `versions`; `inputs` replaces the one feature tensor (raw inputs)."""
