"""What one serving benchmark run does: typed, validated settings (every problem listed at once)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.errors import SettingsError
from bench.model import BENCH_TARGETS, BenchModelSpec
from bench.report import load_targets
from export.triton_config import ServingSettings
from server.settings import TritonSettings

Client = Literal["h2", "grpc-aio"]
PredictionLog = Literal["off", "on", "both"]


@dataclass(frozen=True)
class RawBenchSpec:
    """The raw-transaction path of the serving benchmark (bench.online): the fraud model on raw fields, history
    features read from and written to a Redis online store inside Triton.

    rows: generated transactions the model is trained on and the store is backfilled with; trees / depth: boosting
    rounds at most (early stopping may keep fewer) and tree depth; check_transactions: new transactions whose served
    scores are checked against offline features + xgboost before anything is timed; concurrency: requests in
    flight of the throughput step; max_txn_per_s: the rate the pool of distinct pre-serialized transactions is
    sized for (a step that would send more fails instead of repeating a transaction_id, which takes the cheaper
    idempotent path); seed: of the data and the model; target: the export target serving it (`treeops export
    --target`; None: what `--raw-inputs` exports by default).
    """

    rows: int = 200_000
    trees: int = 200
    depth: int = 6
    check_transactions: int = 200
    concurrency: int = 32
    max_txn_per_s: int = 30_000
    seed: int = 7
    target: str | None = None

    def problems(self) -> list[str]:
        out = []
        if self.rows < 1000:
            out.append(f"raw.rows must be >= 1000 (train/valid/test split and a card population), got {self.rows}")
        if min(self.trees, self.depth, self.check_transactions, self.concurrency, self.max_txn_per_s) < 1:
            out.append("raw.trees, depth, check_transactions, concurrency and max_txn_per_s must be >= 1")
        return out


@dataclass(frozen=True)
class BenchSettings:
    """What one serving benchmark run does; sizes fit a 2-core machine (about a minute) by default.

    model: the forest to train and serve; target: the export target that serves it, named as `treeops export
    --target` names it (native-compiled: the tl2cgen forest in treeops' C backend; python-compiled: the same
    forest in the Python backend's model.py; python-onnx: ONNX Runtime in the Python backend); serving: its
    config.pbtxt settings (batching, instances);
    triton: tritonserver flags (ports, repository, TLS and admin key are chosen by the benchmark);
    sequential_requests / health_requests: timed calls of the sequential steps (after `warmup_requests`);
    concurrency: closed-loop levels of the single-row sweep, each measured for `step_s` after `warmup_s`;
    batch_rows / batch_concurrency: the large-request step; client: load generator of the sweep and the
    batch step ("h2": the minimal HTTP/2 client, "grpc-aio": grpc.aio); client_processes / connections:
    load-generator processes and HTTP/2 connections per process; reference_client: also run the top
    concurrency with grpc.aio; floor_repeats: timed calls per in-process floor figure; model_source: a
    model.py served instead of the target's (A/B of the request path; None: the target's own);
    perf_analyzer: also drive NVIDIA perf_analyzer (bench.perf_analyzer) at each of `perf_analyzer_concurrency`,
    from `perf_analyzer_path` (None: looked up, see bench.perf_analyzer.find_perf_analyzer); when it is not
    installed the run says how to install it and reports the light client's figures alone; targets_path: the
    serving targets the run is checked against (None: bench/targets.toml); raw: also measure the raw-transaction
    path (RawBenchSpec; needs redis-server), None: the feature-tensor path alone;
    prediction_log: "off" (the default) or "on" serves the whole run without or with the prediction log; "both" also
    starts a second Triton with the log on (same model files) and measures, in `log_rounds` rounds alternating which
    server goes first, the bare round trip, single rows sequential and at `log_concurrency` in flight on each: the
    log's cost, and that the "on" server logged every request it answered.
    """

    model: BenchModelSpec = field(default_factory=BenchModelSpec)
    target: str = "native-compiled"
    serving: ServingSettings = field(default_factory=ServingSettings)
    triton: TritonSettings = field(default_factory=TritonSettings)
    sequential_requests: int = 2000
    health_requests: int = 2000
    warmup_requests: int = 200
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    step_s: float = 3.0
    warmup_s: float = 0.5
    batch_rows: int = 256
    batch_concurrency: int = 8
    client: Client = "h2"
    client_processes: int = 1
    connections: int = 1
    reference_client: bool = True
    floor_repeats: int = 300
    model_source: Path | None = None
    perf_analyzer: bool = True
    perf_analyzer_concurrency: tuple[int, ...] = (1, 32)
    perf_analyzer_path: Path | None = None
    targets_path: Path | None = None
    raw: RawBenchSpec | None = field(default_factory=RawBenchSpec)
    prediction_log: PredictionLog = "off"
    log_rounds: int = 3
    log_concurrency: int = 32

    def __post_init__(self) -> None:
        problems = []
        if min(self.sequential_requests, self.health_requests) < 1 or self.warmup_requests < 0:
            problems.append("sequential_requests and health_requests must be >= 1, warmup_requests >= 0")
        if not self.concurrency or min(self.concurrency) < 1:
            problems.append(f"concurrency needs levels >= 1, got {self.concurrency}")
        if self.step_s <= 0 or self.warmup_s < 0:
            problems.append(f"step_s must be > 0 and warmup_s >= 0, got {self.step_s} and {self.warmup_s}")
        if not 1 <= self.batch_rows <= self.serving.max_batch_size:
            problems.append(f"batch_rows must be 1..max_batch_size ({self.serving.max_batch_size}), got {self.batch_rows}")
        if min(self.batch_concurrency, self.client_processes, self.connections, self.floor_repeats) < 1:
            problems.append("batch_concurrency, client_processes, connections and floor_repeats must be >= 1")
        if self.target not in BENCH_TARGETS:
            problems.append(f"target must be one of {', '.join(BENCH_TARGETS)}, got {self.target!r}")
        if self.client not in ("h2", "grpc-aio"):
            problems.append(f"client must be 'h2' or 'grpc-aio', got {self.client!r}")
        if self.model_source is not None and not Path(self.model_source).is_file():
            problems.append(f"model_source {self.model_source} is not a file")
        if self.perf_analyzer and (not self.perf_analyzer_concurrency or min(self.perf_analyzer_concurrency) < 1):
            problems.append(f"perf_analyzer_concurrency needs levels >= 1, got {self.perf_analyzer_concurrency}")
        if self.perf_analyzer_path is not None and not Path(self.perf_analyzer_path).is_file():
            problems.append(f"perf_analyzer_path {self.perf_analyzer_path} is not a file")
        if self.targets_path is not None:
            try:
                load_targets(self.targets_path)
            except SettingsError as exc:
                problems.append(str(exc))
        if self.raw is not None:
            problems += self.raw.problems()
        if self.prediction_log not in ("off", "on", "both"):
            problems.append(f"prediction_log must be 'off', 'on' or 'both', got {self.prediction_log!r}")
        if min(self.log_rounds, self.log_concurrency) < 1:
            problems.append(f"log_rounds and log_concurrency must be >= 1, got {self.log_rounds} and "
                            f"{self.log_concurrency}")
        if problems:
            raise SettingsError("invalid benchmark settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        out["serving"] = self.serving.model_dump()
        out["triton"] = [a for a in self.triton.to_args(redact=True) if _is_tuning_flag(a)]
        out["model_source"] = str(self.model_source) if self.model_source else None
        out["perf_analyzer_path"] = str(self.perf_analyzer_path) if self.perf_analyzer_path else None
        out["targets_path"] = str(self.targets_path) if self.targets_path else None
        return out



def _is_tuning_flag(arg: str) -> bool:
    return not arg.startswith(("--model-repository", "--grpc-port", "--http-port", "--metrics-port",
                               "--backend-directory", "--grpc-address", "--http-address", "--metrics-address",
                               "--load-model"))
