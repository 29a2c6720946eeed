"""KServe requests built from the served model's signature, and blocking raw gRPC calls (sequential steps)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from bench.errors import RequestFailedError, SettingsError
from bench.model import BENCH_MODEL
from export.signature import ServedSignature, Tensor

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
LIVE_METHOD = "/inference.GRPCInferenceService/ServerLive"
#: Distinct payloads cycled through by the load generators (each a different slice of the rows).
PAYLOADS = 64


def feature_tensor(signature: ServedSignature, n_features: int) -> Tensor:
    """The served model's one feature tensor, `n_features` wide; SettingsError for any other signature."""
    tensor = signature.feature_tensor
    if tensor is None or tensor.dims != (n_features,):
        raise SettingsError(f"the benchmark sends one FP32 tensor of {n_features} features per row, but the served "
                            f"model has {signature.describe()}; benchmark a feature-tensor export target")
    return tensor


def infer_payloads(signature: ServedSignature, rows: np.ndarray, rows_per_request: int, model: str = BENCH_MODEL,
                   count: int = PAYLOADS) -> list[bytes]:
    """Serialized KServe `ModelInferRequest`s for `signature`, `rows_per_request` consecutive rows each (cycled
    through `rows`)."""
    tensor = feature_tensor(signature, rows.shape[1])
    payloads = []
    span = max(len(rows) - rows_per_request + 1, 1)
    for i in range(count):
        start = (i * rows_per_request) % span
        x = np.ascontiguousarray(rows[start : start + rows_per_request], dtype=tensor.numpy_dtype)
        request = service_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(x.shape))
        request.outputs.add(name=signature.output.name)
        request.raw_input_contents.append(x.tobytes())
        payloads.append(request.SerializeToString())
    return payloads


def decode_outputs(signature: ServedSignature, response: bytes) -> np.ndarray:
    """The score output (`signature.output`) of a serialized `ModelInferResponse`."""
    message = service_pb2.ModelInferResponse.FromString(response)
    index = [o.name for o in message.outputs].index(signature.output.name)
    shape = list(message.outputs[index].shape)
    return np.frombuffer(message.raw_output_contents[index], dtype=signature.output.numpy_dtype).reshape(shape)



def sequential_latency(url: str, method: str, payloads: Sequence[bytes], requests: int) -> tuple[np.ndarray, float]:
    """`requests` blocking raw gRPC calls, one at a time; returns the latencies (ns) and the client CPU seconds."""
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(method)
        samples = np.empty(requests, dtype=np.int64)
        cpu0 = time.process_time()
        for i in range(requests):
            payload = payloads[i % len(payloads)]
            start = time.perf_counter_ns()
            call(payload)
            samples[i] = time.perf_counter_ns() - start
        return samples, time.process_time() - cpu0


def response_size(url: str, method: str, payload: bytes) -> int:
    """Bytes of the gRPC response message to `payload` (a checked call: raises on any error status)."""
    with grpc.insecure_channel(url) as channel:
        try:
            return len(channel.unary_unary(method)(payload))
        except grpc.RpcError as exc:
            raise RequestFailedError(f"{method} failed on {url}: {exc.code().name} {exc.details()}") from exc
