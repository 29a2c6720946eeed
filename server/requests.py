"""Inference requests built from a served model's signature: inputs checked and cast, as gRPC or KServe v2 JSON.

A raw-transaction model (export/online.py) takes the request parameter READ_ONLY (true: score without
updating the online store) and answers DEGRADED (BOOL per row) beside its scores.

Light on purpose (numpy and tritonclient only): the Locust users import it next to the scoring clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from export.signature import ServedSignature
from server.errors import ScoringError

#: Request parameter of raw-transaction models: score from the stored history without adding the transaction.
READ_ONLY = "treeops_read_only"
#: Output of raw-transaction models: true for a row scored without history (online store down).
DEGRADED = "treeops_degraded"


def conform(signature: ServedSignature, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds` (input name -> rows x dims) checked against `signature` and cast to its datatypes, in its order.

    Raises ScoringError naming the input and what the served model takes: a missing or unexpected
    input, rows that disagree, per-row dims that differ, or values that do not cast safely.
    """
    expected = [t.name for t in signature.inputs]
    missing, extra = [n for n in expected if n not in feeds], sorted(set(feeds) - set(expected))
    if missing or extra:
        raise ScoringError(
            f"the served model takes inputs {expected}; got {sorted(feeds)}"
            + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else "")
            + f": build requests from its signature ({signature.describe()})"
        )
    out: dict[str, np.ndarray] = {}
    for t in signature.inputs:
        values = np.asarray(feeds[t.name])
        if values.ndim != len(t.dims) + 1 or values.shape[1:] != t.dims or values.shape[0] == 0:
            raise ScoringError(f"input {t.name!r} has shape {values.shape}; the served model takes {t.describe()} "
                               "(a non-empty batch of rows)")
        target = np.dtype(t.numpy_dtype)
        if t.datatype == "BYTES":
            if values.dtype.kind not in "USO":
                raise ScoringError(f"input {t.name!r} holds {values.dtype}; the served model takes {t.describe()} "
                                   "(strings)")
        elif not np.can_cast(values.dtype, target, "same_kind"):
            raise ScoringError(f"input {t.name!r} holds {values.dtype}, which does not cast safely to "
                               f"{t.datatype}; the served model takes {t.describe()}")
        out[t.name] = np.ascontiguousarray(values, dtype=target)
    if len({len(v) for v in out.values()}) != 1:
        raise ScoringError(f"inputs have different row counts {({k: len(v) for k, v in out.items()})}; "
                           "give every input the same rows")
    return out


def grpc_request(
    signature: ServedSignature, feeds: Mapping[str, np.ndarray]
) -> tuple[list[grpcclient.InferInput], list[grpcclient.InferRequestedOutput]]:
    """gRPC inputs for already conformed `feeds`, asking for the signature's outputs."""
    inputs = []
    for t in signature.inputs:
        values = feeds[t.name]
        inp = grpcclient.InferInput(t.name, list(values.shape), t.datatype)
        inp.set_data_from_numpy(values)
        inputs.append(inp)
    return inputs, [grpcclient.InferRequestedOutput(t.name) for t in signature.outputs]


def http_body(signature: ServedSignature, feeds: Mapping[str, np.ndarray], read_only: bool = False) -> dict[str, Any]:
    """The KServe v2 JSON body (`POST /v2/models/<m>/infer`) for already conformed `feeds`."""
    def data(values: np.ndarray) -> list[Any]:
        flat = values.ravel()
        return [v.decode() if isinstance(v, bytes) else str(v) for v in flat] if values.dtype == object else flat.tolist()

    body = {
        "inputs": [{"name": t.name, "shape": list(feeds[t.name].shape), "datatype": t.datatype,
                    "data": data(feeds[t.name])} for t in signature.inputs],
        "outputs": [{"name": t.name} for t in signature.outputs],
    }
    if read_only:
        body["parameters"] = {READ_ONLY: True}
    return body


def read_signature(url: str, model_name: str, protocol: str = "grpc", timeout_s: float = 5.0) -> ServedSignature:
    """The signature Triton at `url` (host:port) publishes for `model_name`, over plain gRPC or HTTP."""
    from tritonclient.utils import InferenceServerException

    try:
        if protocol == "grpc":
            with grpcclient.InferenceServerClient(url) as client:
                metadata = client.get_model_metadata(model_name, as_json=True, client_timeout=timeout_s)
        else:
            import tritonclient.http as httpclient

            with httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s) as client:
                metadata = client.get_model_metadata(model_name)
    except InferenceServerException as exc:
        raise ScoringError(f"cannot read model {model_name!r}'s signature from Triton at {url} ({protocol}): "
                           f"{exc.status()} {exc.message()}; is Triton serving it there?") from exc
    except OSError as exc:
        raise ScoringError(f"cannot read model {model_name!r}'s signature from Triton at {url} ({protocol}): "
                           f"{exc}; is Triton running there?") from exc
    return ServedSignature.from_metadata(metadata)
