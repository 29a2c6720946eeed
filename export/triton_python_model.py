"""Triton Python-backend model: runs the version's `model.onnx` with ONNX Runtime.

This file is copied as `model.py` into every version folder and runs inside Triton's stub
process: it imports nothing from treeops. Tensor names come from the model config, whose
inputs are the ONNX graph's inputs: one feature tensor, or several raw fields (strings
arrive as bytes and are decoded). All requests of a dynamic batch are scored in one ONNX
Runtime call.
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
        self.input = config["input"][0]["name"]
        self.inputs = [i["name"] for i in config["input"]]
        self.strings = {i["name"] for i in config["input"] if i["data_type"] == "TYPE_STRING"}
        self.output = config["output"][0]["name"]
        self.outputs = [self.output]

    def execute(self, requests):
        if len(self.inputs) == 1:
            arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
            feeds = {self.input: arrays[0] if len(arrays) == 1 else np.concatenate(arrays)}
        else:
            feeds = {name: self._gather(requests, name) for name in self.inputs}
            arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        probabilities = self.session.run(self.outputs, feeds)[0]
        responses = []
        start = 0
        for rows in arrays:
            stop = start + len(rows)
            out = pb_utils.Tensor(self.output, probabilities[start:stop])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start = stop
        return responses

    def _gather(self, requests, name):
        parts = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if name in self.strings:
            batch = np.array([v.decode("utf-8", "replace") for v in batch.ravel()], dtype=object).reshape(batch.shape)
        return batch

    def finalize(self):
        self.session = None
