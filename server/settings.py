"""Typed Triton server settings and the one place that turns them into `tritonserver` flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Triton APIs that may be restricted to admin-key holders. Health (the launcher's and Kubernetes'
#: probes), metadata and inference are deliberately not in this list: they always stay open.
AdminApi = Literal["model-repository", "model-config", "shared-memory", "statistics", "trace", "logging"]
DEFAULT_ADMIN_APIS: tuple[AdminApi, ...] = ("model-repository", "shared-memory", "statistics", "trace", "logging")
DEFAULT_ADMIN_HEADER = "treeops-admin-key"
ADMIN_KEY_ENV = "TREEOPS_TRITON_ADMIN_KEY"
#: How raw-transaction models inside tritonserver find the online store (backends/online_model.py).
ONLINE_STORE_URL_ENV = "TREEOPS_ONLINE_STORE_URL"
#: How the Python-backend models inside tritonserver find their prediction-log settings (backends/prediction_log.py).
PREDICTION_LOG_DIR_ENV = "TREEOPS_PREDICTION_LOG_DIR"
PREDICTION_LOG_SAMPLE_RATE_ENV = "TREEOPS_PREDICTION_LOG_SAMPLE_RATE"
PREDICTION_LOG_MAX_BYTES_ENV = "TREEOPS_PREDICTION_LOG_MAX_BYTES"
PREDICTION_LOG_RING_SIZE_ENV = "TREEOPS_PREDICTION_LOG_RING_SIZE"
PREDICTION_LOG_FLUSH_INTERVAL_ENV = "TREEOPS_PREDICTION_LOG_FLUSH_INTERVAL_S"
REDACTED = "**********"
#: What `server/admin_key_shim.c` replaces with the value of ADMIN_KEY_ENV inside tritonserver.
ADMIN_KEY_PLACEHOLDER = "@TREEOPS_TRITON_ADMIN_KEY@"
_ADMIN_KEY = re.compile(r"[\x21-\x7e]{16,}")


class TritonSettings(BaseSettings):
    """How tritonserver runs; every field maps to a flag in `to_args`. Env prefix `TREEOPS_TRITON_`.

    Validation errors never echo input values, so a bad admin key is not printed.
    """

    model_config = SettingsConfigDict(env_prefix="TREEOPS_TRITON_", extra="forbid", hide_input_in_errors=True)

    model_repository: Path = Field(Path("model_repository"), description="Triton model repository (local path)")
    model_repository_uri: str | None = Field(
        None, pattern=r"^(s3|gs|as)://\S+$",
        description="cloud model repository (s3://bucket/path, gs://..., as://...) served instead of model_repository",
    )
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
    summary_latencies: bool = Field(
        False,
        description="publish p50..p999 latency summaries on the metrics port; off by default: they cost 60-75% of "
        "single-row throughput at 32 in flight on 2 cores (`treeops bench serving`), while the duration counters stay on",
    )
    allow_gpu_metrics: bool = Field(False, description="publish GPU utilization and memory metrics (needs a GPU)")
    log_verbose: int = Field(0, ge=0, description="tritonserver verbose log level")
    log_format: Literal["default", "ISO8601"] = Field("default", description="tritonserver log line format")
    backend_directory: Path | None = Field(None, description="where backends live; set by the launcher for the wheel")
    grpc_infer_allocation_pool_size: int = Field(16, ge=1, description="gRPC response objects kept for reuse")
    buffer_manager_thread_count: int = Field(0, ge=0, description="threads for input buffer copies (0 = inline)")
    admin_key: SecretStr | None = Field(
        None,
        description=f"value of `admin_header` required by the `admin_apis` (env {ADMIN_KEY_ENV}); None: all open",
    )
    insecure_admin: bool = Field(
        False,
        description="start without admin_key, leaving the admin APIs (load, unload, ...) open to anyone who reaches "
        "the ports; the launcher refuses a keyless start unless this is set, and warns when it is",
    )
    admin_header: str = Field(
        DEFAULT_ADMIN_HEADER, pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="HTTP header / gRPC metadata key carrying the admin key (lowercase, as gRPC requires)",
    )
    admin_apis: tuple[AdminApi, ...] = Field(
        DEFAULT_ADMIN_APIS, min_length=1, description="HTTP and gRPC APIs restricted to admin-key holders"
    )
    grpc_use_ssl: bool = Field(False, description="serve gRPC over TLS with grpc_server_cert and grpc_server_key")
    grpc_use_ssl_mutual: bool = Field(False, description="gRPC TLS that also requires client certificates")
    grpc_server_cert: Path | None = Field(None, description="PEM server certificate (chain) for gRPC TLS")
    grpc_server_key: Path | None = Field(None, description="PEM private key of grpc_server_cert")
    grpc_root_cert: Path | None = Field(None, description="PEM CA that client certificates must chain to (mutual TLS)")
    online_store_url: str | None = Field(
        None, pattern=r"^(redis|rediss|unix)://\S+$",
        description=f"online store (Redis) URL given to tritonserver as {ONLINE_STORE_URL_ENV} for raw-transaction "
        "models; `treeops serve` sets it from OnlineStoreSettings, or to the local redis-server it starts",
    )

    prediction_log_dir: Path | None = Field(
        None, description="root of the prediction log the Python-backend models write (Parquet by model/version/date/"
        f"hour, given to tritonserver as {PREDICTION_LOG_DIR_ENV}); None: no log. `treeops serve` and the demo use "
        "<workspace>/prediction_log",
    )
    prediction_log_sample_rate: float = Field(
        1.0, ge=0.0, le=1.0, description="share of requests logged, chosen by a hash of the request id (a retry "
        "gets the same decision)")
    prediction_log_max_bytes: int = Field(
        10 * 2**30, ge=1, description="retention: past this size a model's oldest log segments are deleted")
    prediction_log_ring_size: int = Field(
        100_000, ge=1, description="requests queued in memory for the log writer; past it records are dropped and "
        "counted (treeops_prediction_log_dropped_total), never blocking a request")
    prediction_log_flush_interval_s: float = Field(
        1.0, ge=0.01, le=60.0, description="the writer writes a segment at least this often: what kill -9 may lose")

    @field_validator("admin_key")
    @classmethod
    def _check_admin_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _ADMIN_KEY.fullmatch(value.get_secret_value()):
            raise ValueError(
                "the admin key must be at least 16 printable ASCII characters without spaces; "
                "generate one with `openssl rand -hex 32`"
            )
        return value

    @model_validator(mode="after")
    def _check_ports(self) -> TritonSettings:
        ports = {"grpc_port": self.grpc_port, "http_port": self.http_port, "metrics_port": self.metrics_port}
        if len(set(ports.values())) < len(ports):
            given = ", ".join(f"{k} {v}" for k, v in ports.items())
            raise ValueError(f"the gRPC, HTTP and metrics ports must differ ({given}); give each its own port")
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> TritonSettings:
        tls = self.grpc_use_ssl or self.grpc_use_ssl_mutual
        if tls and (self.grpc_server_cert is None or self.grpc_server_key is None):
            raise ValueError("gRPC TLS needs grpc_server_cert and grpc_server_key (PEM files)")
        if self.grpc_use_ssl_mutual and self.grpc_root_cert is None:
            raise ValueError("mutual gRPC TLS needs grpc_root_cert: the CA that signs the client certificates")
        return self

    def to_args(self, *, redact: bool = False, key_placeholder: bool = False) -> list[str]:
        """The `tritonserver` command-line flags for these settings (without the binary).

        `redact=True` replaces the admin key with asterisks, for logging the command line;
        `key_placeholder=True` with ADMIN_KEY_PLACEHOLDER, for a tritonserver run with the admin-key shim.
        """
        repository = self.model_repository_uri or self.model_repository.resolve()
        args = [
            f"--model-repository={repository}",
            f"--grpc-address={self.bind_address}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.bind_address}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.bind_address}",
            f"--metrics-port={self.metrics_port}",
            "--allow-grpc=true",
            "--allow-http=true",
            "--allow-metrics=true",
            f"--allow-gpu-metrics={str(self.allow_gpu_metrics).lower()}",
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
        if self.admin_key is not None:
            key = REDACTED if redact else ADMIN_KEY_PLACEHOLDER if key_placeholder else self.admin_key.get_secret_value()
            restriction = f"{','.join(self.admin_apis)}:{self.admin_header}={key}"
            args += [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]
        if self.grpc_use_ssl or self.grpc_use_ssl_mutual:
            args += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={self.grpc_server_cert.resolve()}",
                f"--grpc-server-key={self.grpc_server_key.resolve()}",
            ]
        if self.grpc_use_ssl_mutual:
            args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.grpc_root_cert.resolve()}"]
        return args

    def prediction_log_environment(self) -> dict[str, str]:
        """The prediction-log variables for tritonserver's environment (empty when the log is off)."""
        if self.prediction_log_dir is None:
            return {}
        return {
            PREDICTION_LOG_DIR_ENV: str(self.prediction_log_dir.resolve()),
            PREDICTION_LOG_SAMPLE_RATE_ENV: repr(self.prediction_log_sample_rate),
            PREDICTION_LOG_MAX_BYTES_ENV: str(self.prediction_log_max_bytes),
            PREDICTION_LOG_RING_SIZE_ENV: str(self.prediction_log_ring_size),
            PREDICTION_LOG_FLUSH_INTERVAL_ENV: repr(self.prediction_log_flush_interval_s),
        }

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


class SupervisionSettings(BaseSettings):
    """How `treeops serve` watches the tritonserver it started. Env prefix `TREEOPS_SERVE_`."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_SERVE_", extra="forbid")

    liveness_interval_s: float = Field(5.0, gt=0, description="seconds between `/v2/health/live` checks")
    liveness_timeout_s: float = Field(2.0, gt=0, description="seconds one liveness check may take")
    liveness_failures: int = Field(
        3, ge=1, description="consecutive failed liveness checks after which serve stops Triton and exits non-zero"
    )
