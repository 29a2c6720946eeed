"""Triton Python-backend model: runs the version's `model.onnx` with ONNX Runtime.

This file is copied as `model.py` into every version folder and runs inside Triton's stub
process: it imports nothing from treeops. Tensor names come from the model config. All requests of a dynamic batch are scored in one
ONNX Runtime call.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Python-backend entry points: `initialize`, `execute`, `finalize`."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("ort_intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        self.session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options, providers=providers)
        self.onnx_input = self.session.get_inputs()[0].name
        self.input = config["input"][0]["name"]
        self.output = config["output"][0]["name"]
        self.outputs = [self.output]

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        probabilities = self.session.run(self.outputs, {self.onnx_input: batch})[0]
        responses = []
        start = 0
        for rows in arrays:
            stop = start + len(rows)
            out = pb_utils.Tensor(self.output, probabilities[start:stop])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start = stop
        return responses

    def finalize(self):
        self.session = None
