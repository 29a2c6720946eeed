"""Typed settings -> Triton `config.pbtxt`, built as `model_config.proto` messages and re-parsed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from google.protobuf import text_format
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from tritonclient.grpc import model_config_pb2 as mc

from export.errors import RepositoryError


class ServingSettings(BaseSettings):
    """How Triton batches and places one model. Env prefix `TREEOPS_SERVING_`; unknown fields and an unknown
    `instance_kind` fail, naming the valid ones.

    Defaults measured with `treeops bench serving` (bench/) (200 trees depth 6, 2 cores, client on the same machine):
    - max_queue_delay_us 0: a lone request no longer waits for company (Triton's queue time of a
      sequential single-row call fell from ~200 to ~30 µs, p50 -170 µs). Under load batches still
      form while the instance is busy: 15-19 rows per execution at 32 in flight, throughput unchanged.
    - preferred_batch_sizes empty: with no delay the batcher takes whatever is queued; preferred
      sizes would only split those batches (the largest one caps them).
    - instance_count 2: one Python-backend instance is a serial pipeline (parent thread, then its stub
      process) and uses one core at most; two double the rows/s of 256-row requests (about 1.6-1.9x)
      and leave single-row throughput at 32 in flight unchanged, at -5..-13% from 8 to 16 in flight
      (smaller batches). Each instance is a stub process of ~80 MB.
    """

    model_config = SettingsConfigDict(env_prefix="TREEOPS_SERVING_", extra="forbid", frozen=True)

    max_batch_size: int = Field(1024, ge=1, description="largest batch Triton assembles (and largest request it accepts)")
    dynamic_batching: bool = Field(True, description="Triton's dynamic batcher on (off: its default scheduler)")
    max_queue_delay_us: int = Field(0, ge=0, description="how long the dynamic batcher waits to fill a batch")
    preferred_batch_sizes: tuple[int, ...] = Field((), description="batch sizes the batcher forms at once when it can")
    instance_count: int = Field(2, ge=1, description="model instances")
    instance_kind: Literal["cpu", "gpu"] = Field("cpu", description="where the instances run: cpu or gpu")
    warmup: bool = Field(True, description="warm each instance up with batches of 1 and 64 zero rows at load")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor, per row (the batch dimension is implicit)."""

    name: str
    dims: tuple[int, ...]
    data_type: str = "TYPE_FP32"


def model_config(
    name: str,
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    serving: ServingSettings,
    versions: Iterable[int],
    backend: str | None = None,
    platform: str | None = None,
    parameters: Mapping[str, str] | None = None,
) -> mc.ModelConfig:
    """Assemble a ModelConfig; `versions` become a `specific` version policy."""
    cfg = mc.ModelConfig(name=name, max_batch_size=serving.max_batch_size)
    if backend:
        cfg.backend = backend
    if platform:
        cfg.platform = platform
    for t in inputs:
        cfg.input.add(name=t.name, data_type=mc.DataType.Value(t.data_type), dims=list(t.dims))
    for t in outputs:
        cfg.output.add(name=t.name, data_type=mc.DataType.Value(t.data_type), dims=list(t.dims))
    kind = mc.ModelInstanceGroup.KIND_GPU if serving.instance_kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(count=serving.instance_count, kind=kind)
    if serving.dynamic_batching:
        cfg.dynamic_batching.max_queue_delay_microseconds = serving.max_queue_delay_us
        cfg.dynamic_batching.preferred_batch_size.extend(serving.preferred_batch_sizes)
    cfg.version_policy.specific.versions.extend(sorted(set(versions)))
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    if serving.warmup:
        for batch in sorted({1, min(serving.max_batch_size, 64)}):
            warm = cfg.model_warmup.add(name=f"warmup_batch_{batch}", batch_size=batch)
            for t in inputs:
                warm.inputs[t.name].data_type = mc.DataType.Value(t.data_type)
                warm.inputs[t.name].dims.extend(t.dims)
                warm.inputs[t.name].zero_data = True
    return cfg


def render(cfg: mc.ModelConfig) -> str:
    """The `config.pbtxt` text of `cfg`, checked by parsing it back with Triton's schema."""
    text = text_format.MessageToString(cfg)
    parse(text, source=f"generated config of {cfg.name!r}")
    return text


def parse(text: str, source: str = "config.pbtxt") -> mc.ModelConfig:
    """Parse `text` against `model_config.proto`; unknown fields raise RepositoryError naming `source`."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"{source} is not a valid Triton model config: {exc}") from exc
