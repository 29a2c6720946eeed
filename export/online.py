"""The raw-transaction model: a spec with history features served with its state in the online store.

Clients send the raw fields of each transaction; inside Triton, backends/online_model.py reads and
updates each entity's history in Redis (backends/online_history.py) and feeds the history features,
with the raw fields, to the raw graph (export/raw_graph.py). This module describes that model to
export: its inputs (the raw fields it needs, typed from the raw schema) and its config parameters.

Inputs, dims [1] each (requests [N, 1]), named after the raw fields: String -> BYTES, Int64 -> INT64,
Float64 -> FP64, Datetime -> INT64 epoch microseconds UTC. They are the fields the stateless
features read, plus each history feature's entity, time and value fields, plus `transaction_id`
(a retried transaction is recognised by it and counted once), in raw-schema order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import polars as pl

from backends.online_history import namespace_for
from export.errors import UnsupportedModelError
from export.raw_graph import RawDtype, RawInput, raw_inputs
from export.triton_config import ServingSettings, TensorSpec
from training.features import Feature, FittedFeatures

StorePolicy = Literal["error", "score_without_history"]
#: The raw field that identifies a transaction: the store's idempotency key.
TRANSACTION_ID = "transaction_id"
#: Config parameters the online model reads (besides the alias versions and spec hash every model has).
POLICY_PARAMETER = "on_store_unavailable"
NAMESPACE_PARAMETER = "store_namespace"
TRANSACTION_ID_PARAMETER = "transaction_id_field"
NON_NEGATIVE_PARAMETER = "non_negative_fields"
#: Second output: true for each row scored without history (store down, policy score_without_history).
#: An output, not a response parameter: tritonserver 2.51's Python backend cannot set response parameters
#: (its `InferenceResponse` takes only `output_tensors` and `error`).
DEGRADED_OUTPUT = TensorSpec("treeops_degraded", (1,), "TYPE_BOOL")
#: Config parameter documenting that output for clients reading the model config (`GET /v2/models/<m>/config`).
DEGRADED_DOC_PARAMETER = "treeops_degraded_output"
DEGRADED_DOC = ("output BOOL [-1, 1]: true for a row scored without its history features because the online store "
                "was unreachable (on_store_unavailable=score_without_history), false otherwise; such answers are "
                "counted in treeops_degraded_answers_total on the metrics port")


def history_features(fitted: FittedFeatures) -> list[Feature]:
    """The spec's history features, in spec order (empty: a stateless spec)."""
    return [f for f in fitted.spec.features if f.history is not None]


def is_online(fitted: FittedFeatures | None) -> bool:
    """Whether `fitted` needs the online store to be served from raw fields."""
    return fitted is not None and bool(history_features(fitted))


def _raw_dtype(name: str, dtype: pl.DataType) -> RawDtype:
    if dtype == pl.String:
        return "string"
    if dtype == pl.Int64 or isinstance(dtype, pl.Datetime):
        return "int64"
    if dtype == pl.Float64:
        return "double"
    raise UnsupportedModelError(f"raw field {name!r} has type {dtype}; the raw-transaction model serves String, "
                                "Int64, Float64 and Datetime fields")


def entity_field(fitted: FittedFeatures) -> str:
    """The one raw field keying the spec's history features (the online store's entity)."""
    entities = sorted({f.history.entity for f in history_features(fitted)})
    if len(entities) != 1:
        raise UnsupportedModelError(f"spec {fitted.spec.name!r} keys its history features by {entities}; the "
                                    "online store serves one entity per spec: give them one entity field")
    return entities[0]


def online_inputs(fitted: FittedFeatures) -> list[RawInput]:
    """The raw fields the raw-transaction model takes, in raw-schema order, typed from the raw schema."""
    schema = fitted.spec.raw_schema
    if TRANSACTION_ID not in schema:
        raise UnsupportedModelError(f"spec {fitted.spec.name!r} has history features but no {TRANSACTION_ID!r} raw "
                                    "field: the online store needs it to count a retried transaction once")
    needed = {r.name for r in raw_inputs(fitted) if not r.stateful} | {TRANSACTION_ID, entity_field(fitted)}
    for f in history_features(fitted):
        needed |= {f.history.time} | ({f.history.value} if f.history.value else set())
    missing = sorted(needed - set(schema))
    if missing:
        raise UnsupportedModelError(f"spec {fitted.spec.name!r} reads {missing}, which are not in its raw schema")
    return [RawInput(name, _raw_dtype(name, dtype), f"raw field {name} ({dtype})")
            for name, dtype in schema.items() if name in needed]


def served_inputs(fitted: FittedFeatures) -> list[RawInput]:
    """What a raw-input version takes: raw fields only with history features (the store feeds them),
    else the raw graph's inputs."""
    return online_inputs(fitted) if is_online(fitted) else raw_inputs(fitted)


def non_negative_fields(fitted: FittedFeatures) -> list[str]:
    """The history value fields (sorted): the served model refuses a negative or non-finite one."""
    return sorted({f.history.value for f in history_features(fitted) if f.history.value})


def online_parameters(fitted: FittedFeatures, on_store_unavailable: StorePolicy) -> Mapping[str, str]:
    """The config parameters of the raw-transaction model (empty for a stateless spec); all but the
    `treeops_degraded` output's description are read by backends/online_model.py."""
    if not is_online(fitted):
        return {}
    return {
        POLICY_PARAMETER: on_store_unavailable,
        NAMESPACE_PARAMETER: namespace_for(fitted.spec.name, entity_field(fitted)),
        TRANSACTION_ID_PARAMETER: TRANSACTION_ID,
        NON_NEGATIVE_PARAMETER: ",".join(non_negative_fields(fitted)),
        DEGRADED_DOC_PARAMETER: DEGRADED_DOC,
    }


def online_config(parameters: Mapping[str, str], outputs: list[TensorSpec],
                  serving: ServingSettings) -> tuple[list[TensorSpec], ServingSettings]:
    """The outputs and serving settings of a model with `parameters`: the raw-transaction model (its parameters hold
    POLICY_PARAMETER) adds DEGRADED_OUTPUT and runs no warm-up (warm-up rows would be written to the store)."""
    if POLICY_PARAMETER not in parameters:
        return outputs, serving
    return [*outputs, DEGRADED_OUTPUT], serving.model_copy(update={"warmup": False})
