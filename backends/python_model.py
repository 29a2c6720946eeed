"""Triton Python-backend model: scores the version's forest with ONNX Runtime or a compiled forest.

This file is copied as `model.py` into every version folder and runs inside Triton's stub
process: it imports nothing from treeops. Tensor names come from the model config, whose
inputs are the ONNX graph's inputs: one feature tensor, or several raw fields (strings
arrive as bytes and are decoded). All requests of a dynamic batch are scored in one call.
`initialize` first checks the version's files against the sizes and SHA-256 export recorded in
treeops.json (`verify_files`, from version_files.py copied beside this file), so a damaged file fails
this version, not the stub process.

Runtimes (config parameter `runtime`):
- "onnxruntime" (default): `model.onnx` in one single-threaded session. One thread on purpose:
  with several, ONNX Runtime splits the trees of a small batch between threads and the sums
  come out in another order, so a row's bits would depend on what it was batched with.
- "compiled": `forest.so`, the forest compiled to C (tl2cgen) with the batch entry point
  `predict_rows(const float* x, int64_t rows, float* out)` writing `n_outputs` floats per row;
  one feature tensor only. Each row is computed alone, so its bits never depend on the batch.

The single-tensor request path does only what must happen per request (measured with
`treeops bench serving`): the input by position (the config declares exactly one), no concatenation
for a lone request, one output Tensor and one InferenceResponse per request. Names, bound
methods and the feed key are resolved once in `initialize`.

Every answered request is counted in the serving metrics and, when the prediction log is on (env
TREEOPS_PREDICTION_LOG_DIR), queued for it with its features (or raw fields) and score; a request whose scoring
failed is logged with its error. See serving_monitor.py and prediction_log.py, copied beside this file.
"""

import ctypes
import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils
from serving_monitor import ServingMonitor
from version_files import verify_files

RUNTIMES = ("onnxruntime", "compiled")
_ARROW = {"TYPE_STRING": "string", "TYPE_INT64": "int64", "TYPE_FP64": "float64", "TYPE_FP32": "float32"}


class TritonPythonModel:
    """Python-backend entry points: `initialize`, `execute`, `finalize`."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        verify_files(folder)
        self.input = config["input"][0]["name"]
        self.inputs = [i["name"] for i in config["input"]]
        self.strings = {i["name"] for i in config["input"] if i["data_type"] == "TYPE_STRING"}
        self.output = config["output"][0]["name"]
        self.width = int(config["output"][0]["dims"][-1])
        self.single = len(self.inputs) == 1 and not self.strings
        runtime = params.get("runtime", "onnxruntime")
        if runtime == "onnxruntime":
            self.run = self._onnxruntime(folder, params, args)
        elif runtime == "compiled":
            if not self.single:
                raise ValueError(f"the compiled runtime takes one float feature tensor; the config has {self.inputs}")
            self.run = self._compiled(folder)
        else:
            raise ValueError(f"unknown runtime {runtime!r} in the config parameters; use one of {RUNTIMES}")
        self._tensor = pb_utils.Tensor
        self._response = pb_utils.InferenceResponse
        if self.single:
            features, raw = _feature_names(folder, int(config["input"][0]["dims"][-1])), ()
        else:
            import pyarrow as pa

            features = []
            raw = [(i["name"], getattr(pa, _ARROW.get(i["data_type"], "float32"))()) for i in config["input"]]
        self.monitor = ServingMonitor(pb_utils, args, config, params, folder, features, raw)

    def _onnxruntime(self, folder, params, args):
        """A function feeds -> scores; `feeds` maps input names to batches (or is one batch when single)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("ort_intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        self.session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options, providers=providers)
        run, outputs, name = self.session.run, [self.output], self.input
        if self.single:
            return lambda x: run(outputs, {name: x})[0]
        return lambda feeds: run(outputs, feeds)[0]

    def _compiled(self, folder):
        self.library = ctypes.CDLL(os.path.join(folder, "forest.so"))
        predict = self.library.predict_rows
        predict.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        predict.restype = None
        width, empty, float32 = self.width, np.empty, np.float32

        def run(x):
            x = np.ascontiguousarray(x, dtype=float32)
            out = empty((x.shape[0], width), float32)
            predict(x.ctypes.data, x.shape[0], out.ctypes.data)
            return out

        return run

    def execute(self, requests):
        started, arrival = time.perf_counter_ns(), time.time_ns() // 1000
        monitor = self.monitor
        warmup = monitor.warmup(requests)
        try:
            if self.single:
                arrays = [r.inputs()[0].as_numpy() for r in requests]
                feeds = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                sizes = [len(a) for a in arrays]
            else:
                feeds = {n: self._gather(requests, n) for n in self.inputs}
                sizes = [len(pb_utils.get_input_tensor_by_name(r, self.input).as_numpy()) for r in requests]
            scores = self.run(feeds)
        except Exception as exc:  # a batch the runtime refuses: every request of it fails, logged with the error
            message = f"model {monitor.model!r} version {monitor.version}: scoring failed: {exc}"
            for request in requests[warmup:]:
                request_id = monitor.request_id(request)
                if monitor.should_log(request_id):
                    monitor.log.append(request_id, arrival, error=message)
            return [self._response(error=pb_utils.TritonError(message)) for _ in requests]
        tensor, response, name = self._tensor, self._response, self.output
        responses = []
        start = 0
        for k, (request, size) in enumerate(zip(requests, sizes)):
            part = scores[start : start + size]
            responses.append(response(output_tensors=[tensor(name, part)]))
            if k >= warmup:
                monitor.answered(part, started)
                request_id = monitor.request_id(request)
                if monitor.should_log(request_id):
                    if self.single:
                        monitor.log.append(request_id, arrival, score=part[:, -1], features=arrays[k])
                    else:
                        monitor.log.append(request_id, arrival, score=part[:, -1],
                                           raw={n: feeds[n][start : start + size].reshape(-1) for n in self.inputs})
            start += size
        return responses

    def _gather(self, requests, name):
        parts = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if name in self.strings:
            batch = np.array([v.decode("utf-8", "replace") for v in batch.ravel()], dtype=object).reshape(batch.shape)
        return batch

    def finalize(self):
        self.monitor.close()  # flushes the prediction log: nothing queued is lost on unload or SIGTERM
        self.run = None
        self.session = None
        self.library = None


def _feature_names(folder: str, width: int) -> list[str]:
    """The served features' names from the version's feature spec; a forest exported without one (a benchmark's
    synthetic model) has XGBoost's default names f0..f{width-1}."""
    path = os.path.join(folder, "feature_spec.json")
    if not os.path.exists(path):
        return [f"f{i}" for i in range(width)]
    with open(path, encoding="utf-8") as f:
        return [feature["name"] for feature in json.load(f)["features"]]
