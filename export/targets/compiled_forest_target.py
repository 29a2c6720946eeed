"""What the compiled-forest targets share: `forest.so` (export/compiled_forest.py) and its scorer."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import xgboost as xgb

from export.compiled_forest import COMPILED_FILE, compile_forest, compiled_scorer
from export.parity import Scorer
from export.targets.base import ExportTarget
from training.features import FittedFeatures


class CompiledForestTarget(ExportTarget):
    """Writes `forest.so` plus what runs it (`write_runtime`); parity scores `forest.so` in-process."""

    def write_artifacts(
        self, booster: xgb.Booster, n_features: int, version_dir: Path, raw_features: FittedFeatures | None = None
    ) -> None:
        self.require_feature_tensor(raw_features)
        compile_forest(booster, n_features, version_dir / COMPILED_FILE)
        self.write_runtime(version_dir)

    @abstractmethod
    def write_runtime(self, version_dir: Path) -> None:
        """Write what Triton runs the forest with (a model.py, or a backend library)."""

    def scorer(self, version_dir: Path) -> Scorer:
        return compiled_scorer(version_dir / COMPILED_FILE)
