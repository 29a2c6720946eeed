"""Typed Triton server settings and the one place that turns them into `tritonserver` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TritonSettings(BaseSettings):
    """How tritonserver runs; every field maps to a flag in `to_args`. Env prefix `TREEOPS_TRITON_`."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_TRITON_", extra="forbid")

    model_repository: Path = Field(Path("model_repository"), description="Triton model repository (local path)")
    host: str = Field("127.0.0.1", description="address clients use to reach the server")
    bind_address: str = Field("127.0.0.1", description="interface Triton listens on (0.0.0.0 in a container)")
    grpc_port: int = Field(8001, ge=1, le=65535, description="KServe v2 gRPC port")
    http_port: int = Field(8000, ge=1, le=65535, description="KServe v2 HTTP/REST port")
    metrics_port: int = Field(8002, ge=1, le=65535, description="Prometheus metrics port")
    model_control_mode: Literal["explicit", "poll", "none"] = Field(
        "explicit", description="explicit: models load and switch only through the repository API"
    )
    load_models: tuple[str, ...] = Field(("*",), description="models loaded at start in explicit mode")
    strict_readiness: bool = Field(True, description="ready only when every loaded model is ready")
    exit_on_error: bool = Field(False, description="exit when a model fails to load (False keeps others serving)")
    exit_timeout_s: int = Field(30, ge=0, description="grace period for in-flight requests on shutdown")
    summary_latencies: bool = Field(True, description="publish p50..p999 latency summaries on the metrics port")
    log_verbose: int = Field(0, ge=0, description="tritonserver verbose log level")
    log_format: Literal["default", "ISO8601"] = Field("default", description="tritonserver log line format")
    backend_directory: Path | None = Field(None, description="where backends live; set by the launcher for the wheel")
    grpc_infer_allocation_pool_size: int = Field(16, ge=1, description="gRPC response objects kept for reuse")
    buffer_manager_thread_count: int = Field(0, ge=0, description="threads for input buffer copies (0 = inline)")

    def to_args(self) -> list[str]:
        """The `tritonserver` command-line flags for these settings (without the binary)."""
        args = [
            f"--model-repository={self.model_repository.resolve()}",
            f"--grpc-address={self.bind_address}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.bind_address}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.bind_address}",
            f"--metrics-port={self.metrics_port}",
            "--allow-grpc=true",
            "--allow-http=true",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--model-control-mode={self.model_control_mode}",
            f"--strict-readiness={str(self.strict_readiness).lower()}",
            f"--exit-on-error={str(self.exit_on_error).lower()}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            f"--log-format={self.log_format}",
            f"--grpc-infer-allocation-pool-size={self.grpc_infer_allocation_pool_size}",
        ]
        if self.buffer_manager_thread_count:
            args.append(f"--buffer-manager-thread-count={self.buffer_manager_thread_count}")
        if self.summary_latencies:
            args.append("--metrics-config=summary_latencies=true")
        if self.model_control_mode == "explicit":
            args += [f"--load-model={m}" for m in self.load_models]
        if self.backend_directory is not None:
            args.append(f"--backend-directory={self.backend_directory.resolve()}")
        return args

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"
