"""A tl2cgen-compiled forest served by treeops' own Triton backend (C): no Python in the request path.

The fastest target here (`treeops bench serving`, bench/): Triton calls the forest in its own process instead
of passing each batch to a Python-backend stub. Needs tl2cgen and a C compiler at export time;
the version folder (forest.so + libtriton_treeops_forest.so) is specific to the exporting
machine's architecture and runs on CPU instances. The config carries the serving metrics' declarations
(`treeops_metrics`, export/serving_metrics.py), which the backend registers through Triton's custom-metrics API.

With raw inputs and a spec with history features, the version is the raw-transaction model (export/online.py)
in C: `online.json` (export/native_online.py) tells the backend the raw fields, the online store's layout and
each feature's op; it answers `probabilities` and `treeops_degraded`. A stateless raw-input spec is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import xgboost as xgb
from tritonclient.grpc import model_config_pb2 as mc

from export.compiled_forest import COMPILED_FILE, compiled_scorer
from export.errors import UnsupportedModelError
from export.native_backend import BACKEND_NAME, build_backend
from export.native_online import online_plan, plan_features, read_online_plan, write_online_plan
from export.online import POLICY_PARAMETER, online_config
from export.serving_metrics import serving_metrics_parameter
from export.targets.compiled_forest_target import CompiledForestTarget
from export.triton_config import ServingSettings, TensorSpec, model_config
from training.features import FittedFeatures

_STATELESS_RAW = ("the native-compiled target serves one feature tensor, or raw fields for the raw-transaction "
                  "model (a spec with history features); export a stateless raw-input spec with --target python-onnx")


class NativeCompiledTarget(CompiledForestTarget):
    """`forest.so` plus `libtriton_treeops_forest.so` in the version folder (and `online.json` for the
    raw-transaction model); `backend: "treeops_forest"`."""

    name = "native-compiled"
    supports_raw_inputs = True  # only the raw-transaction model: require_feature_tensor refuses the rest
    supports_history = True

    def require_feature_tensor(self, raw: object | None) -> None:
        """Refuse raw input specs except a spec with history features whose every feature has a C op."""
        super().require_feature_tensor(raw)
        if isinstance(raw, FittedFeatures):
            online_plan(raw)  # raises, naming the feature or the reason, before any file is written

    def write_artifacts(
        self, booster: xgb.Booster, n_features: int, version_dir: Path, raw_features: FittedFeatures | None = None
    ) -> None:
        super().write_artifacts(booster, n_features, version_dir, raw_features)
        if raw_features is not None:
            write_online_plan(version_dir, raw_features)

    def write_runtime(self, version_dir: Path) -> None:
        build_backend(version_dir)

    def raw_scorer(self, version_dir: Path) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
        """The plan's ops in numpy (as the C backend computes them) on raw feeds, then `forest.so`."""
        features = plan_features(read_online_plan(version_dir))
        forest = compiled_scorer(Path(version_dir) / COMPILED_FILE)
        return lambda feeds: forest(features(feeds))

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
        if serving.instance_kind != "cpu":
            raise UnsupportedModelError("the native-compiled target runs on CPU instances; "
                                        "for GPU nodes export with --target fil")
        if inputs is not None and POLICY_PARAMETER not in parameters:
            raise UnsupportedModelError(_STATELESS_RAW)
        outputs, serving = online_config(parameters, [TensorSpec(self.output_name, (n_outputs,))], serving)
        return model_config(
            model_name,
            backend=BACKEND_NAME,
            inputs=list(inputs) if inputs is not None else [TensorSpec(self.input_name, (n_features,))],
            outputs=outputs,
            serving=serving,
            versions=versions,
            parameters={**serving_metrics_parameter(), **parameters},
        )
