"""The served model's signature: its input and output tensors, defined once for every client.

Export writes it into each version's `treeops.json` (key `signature`) and into `config.pbtxt`;
clients read it back from Triton's model metadata (gRPC or HTTP) or from either file, and build
their requests from it, whatever the target (`features` -> `probabilities`, FIL's
`input__0` -> `output__0`, or one input per raw field).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

#: The tensors every feature-tensor target serves (one FP32 row of features in, one row of scores out); the
#: only definition of these names. FIL's are its own (`input__0`/`output__0`); raw-input models take one
#: input per raw field. Clients never use these constants: they read the served model's signature.
FEATURES_INPUT = "features"
SCORES_OUTPUT = "probabilities"

#: KServe v2 datatype -> numpy dtype of the values a client sends or receives.
NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}


@dataclass(frozen=True)
class Tensor:
    """One tensor per row: the batch dimension is implicit (every treeops model batches)."""

    name: str
    datatype: str  # KServe v2 name: FP32, FP64, INT64, BYTES, ...
    dims: tuple[int, ...]

    @property
    def numpy_dtype(self) -> type[np.generic]:
        return NUMPY_DTYPES[self.datatype]

    @property
    def config_type(self) -> str:
        """The datatype as `config.pbtxt` spells it (TYPE_FP32, TYPE_STRING for BYTES)."""
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"

    def describe(self) -> str:
        return f"{self.name} {self.datatype} [-1, {', '.join(map(str, self.dims))}]"


def _datatype_of_config(value: int) -> str:
    name = mc.DataType.Name(value).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


@dataclass(frozen=True)
class ServedSignature:
    """What a served version takes and returns; equal signatures mean the same requests work."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def feature_tensor(self) -> Tensor | None:
        """The one FP32 feature tensor of a tensor model, or None for a raw-input model."""
        if len(self.inputs) == 1 and self.inputs[0].datatype == "FP32" and len(self.inputs[0].dims) == 1:
            return self.inputs[0]
        return None

    @property
    def output(self) -> Tensor:
        """The one score output (probabilities, or the regression value)."""
        return self.outputs[0]

    def input(self, name: str) -> Tensor:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"the served model has no input {name!r}; its inputs: {[t.name for t in self.inputs]}")

    def describe(self) -> str:
        return (f"inputs {', '.join(t.describe() for t in self.inputs)}; "
                f"outputs {', '.join(t.describe() for t in self.outputs)}")

    def differences(self, other: ServedSignature) -> list[str]:
        """What a client built for `self` would get wrong against `other`, one line each (empty: none)."""
        out = []
        for kind, mine, theirs in (("input", self.inputs, other.inputs), ("output", self.outputs, other.outputs)):
            a, b = {t.name: t for t in mine}, {t.name: t for t in theirs}
            out += [f"{kind} {n!r} is gone" for n in a if n not in b]
            out += [f"new {kind} {b[n].describe()}" for n in b if n not in a]
            out += [f"{kind} {a[n].describe()} becomes {b[n].describe()}" for n in a if n in b and a[n] != b[n]]
        return out

    # --- the forms it is stored and published in -------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {k: [{"name": t.name, "datatype": t.datatype, "dims": list(t.dims)} for t in ts]
                for k, ts in (("inputs", self.inputs), ("outputs", self.outputs))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServedSignature:
        """From `treeops.json`'s `signature` (the form `to_dict` writes)."""
        return cls(*(tuple(Tensor(t["name"], t["datatype"], tuple(int(d) for d in t["dims"])) for t in data[k])
                     for k in ("inputs", "outputs")))

    @classmethod
    def from_config(cls, cfg: mc.ModelConfig) -> ServedSignature:
        """From a parsed `config.pbtxt` (every treeops model has max_batch_size > 0: dims are per row)."""
        return cls(*(tuple(Tensor(t.name, _datatype_of_config(t.data_type), tuple(t.dims)) for t in ts)
                     for ts in (cfg.input, cfg.output)))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ServedSignature:
        """From Triton's model metadata: HTTP `GET /v2/models/<m>` JSON, or gRPC's `as_json=True`.

        Shapes there include the batch dimension (-1), which is dropped.
        """
        def tensors(items: Sequence[Mapping[str, Any]]) -> tuple[Tensor, ...]:
            return tuple(Tensor(t["name"], t["datatype"], tuple(int(d) for d in t["shape"])[1:]) for t in items)
        return cls(tensors(metadata["inputs"]), tensors(metadata["outputs"]))
