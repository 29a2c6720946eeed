"""A tl2cgen-compiled forest served by treeops' own Triton backend (C): no Python in the request path.

The fastest target here (`treeops bench serving`, bench/): Triton calls the forest in its own process instead
of passing each batch to a Python-backend stub. Needs tl2cgen and a C compiler at export time;
the version folder (forest.so + libtriton_treeops_forest.so) is specific to the exporting
machine's architecture and runs on CPU instances. The config carries the serving metrics' declarations
(`treeops_metrics`, export/serving_metrics.py), which the backend registers through Triton's custom-metrics API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export.errors import UnsupportedModelError
from export.native_backend import BACKEND_NAME, build_backend
from export.serving_metrics import serving_metrics_parameter
from export.targets.compiled_forest_target import CompiledForestTarget
from export.triton_config import ServingSettings, TensorSpec, model_config


class NativeCompiledTarget(CompiledForestTarget):
    """`forest.so` plus `libtriton_treeops_forest.so` in the version folder; `backend: "treeops_forest"`."""

    name = "native-compiled"

    def write_runtime(self, version_dir: Path) -> None:
        build_backend(version_dir)

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
        return model_config(
            model_name,
            backend=BACKEND_NAME,
            inputs=[TensorSpec(self.input_name, (n_features,))],
            outputs=[TensorSpec(self.output_name, (n_outputs,))],
            serving=serving,
            versions=versions,
            parameters={**serving_metrics_parameter(), **parameters},
        )
