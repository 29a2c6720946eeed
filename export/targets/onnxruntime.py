"""ONNX served by Triton's native onnxruntime backend (`platform: "onnxruntime_onnx"`).

The backend serves the graph's outputs directly, so the graph has exactly the output the config
declares (`probabilities` [N, n_outputs], see `export.onnx_convert`). Not in the pip wheel's
Triton (it reports "unable to find backend library"); use the NGC container.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from tritonclient.grpc import model_config_pb2 as mc

from export.targets.onnx_file import ONNX_FILE, OnnxFileTarget
from export.triton_config import ServingSettings, TensorSpec, model_config

log = logging.getLogger(__name__)



class OnnxRuntimeTarget(OnnxFileTarget):
    """`model.onnx` only; `backend: "onnxruntime"`, one intra-op thread per instance."""

    name = "onnxruntime"

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
        if serving.instance_kind == "gpu":
            log.warning("ONNX Runtime has no CUDA kernels for tree-ensemble ops: %s runs on the CPU "
                        "even in a GPU instance; use the fil target for GPU inference", model_name)
        cfg = model_config(
            model_name,
            backend="onnxruntime",
            platform="onnxruntime_onnx",
            inputs=inputs or [TensorSpec(self.input_name, (n_features,))],
            outputs=[TensorSpec(self.output_name, (n_outputs,))],
            serving=serving,
            versions=versions,
            parameters={"intra_op_thread_count": "1", "inter_op_thread_count": "1", "execution_mode": "0",
                        **parameters},
        )
        cfg.default_model_filename = ONNX_FILE
        return cfg
