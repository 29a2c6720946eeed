"""What one serving benchmark run measured: the figures, the human table and the verdicts against bench/targets.toml."""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from bench.errors import RequestFailedError, SettingsError

if TYPE_CHECKING:
    from bench.settings import BenchSettings

#: The serving targets every run is checked against (a data file, like loadtest/slo-ci.toml).
DEFAULT_TARGETS = Path(__file__).with_name("targets.toml")


@dataclass(frozen=True)
class Floor:
    """In-process time of one scoring call (median over repeats) and the rows/s it implies."""

    runtime: str
    rows: int
    p50_us: float
    rows_per_s: float


@dataclass(frozen=True)
class TritonStats:
    """Triton's statistics over one step, per successful request in µs (`get_inference_statistics` diffs).

    `request_us` is Triton's whole time for the request; `mean_batch_rows` is rows per model
    execution (inference_count / execution_count).
    """

    requests: int
    executions: int
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float
    request_us: float
    mean_batch_rows: float


@dataclass(frozen=True)
class Step:
    """One measured step: throughput, latency percentiles, CPU per request and Triton's view of it.

    `client_cpu_us_per_req`: CPU of the load-generator process(es); `server_cpu_us_per_req`: CPU of
    tritonserver and its Python stub processes; both per completed request of the window.
    """

    name: str
    client: str
    concurrency: int
    rows_per_request: int
    requests: int
    failures: int
    duration_s: float
    req_per_s: float
    rows_per_s: float
    p50_us: float
    p99_us: float
    mean_us: float
    client_cpu_us_per_req: float
    server_cpu_us_per_req: float
    triton: TritonStats | None


@dataclass(frozen=True)
class PerfAnalyzerStep:
    """One perf_analyzer run at `concurrency` single-row requests (bench.perf_analyzer).

    `req_per_s` and the latencies are perf_analyzer's own, from its last (stable) measurement window;
    `requests`, the CPU per request and `triton` cover the whole invocation (warm-up and every window),
    counted by Triton, so they compare with the light client's columns.
    """

    concurrency: int
    req_per_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    requests: int
    client_cpu_us_per_req: float
    server_cpu_us_per_req: float
    triton: TritonStats | None


@dataclass(frozen=True)
class RawPath:
    """What the raw-transaction path measured (bench.online): the store, the served check and three steps.

    `backfill_*`: online_store backfill of the training transactions; `checked` transactions were scored one at a time
    and compared with offline features + xgboost (`max_abs_diff`, `flipped` decisions); `redis_ping`: bare Redis
    round trips from the client process, sequential; `sequential` / `loaded`: single raw transactions, one at a time
    and `loaded.concurrency` in flight, every request a new transaction_id of a backfilled card
    (`distinct_transactions` were serialized for the run; none was sent twice).
    """

    model: str
    trees: int
    history_features: tuple[str, ...]
    backfill_rows: int
    backfill_s: float
    backfill_rows_per_s: float
    checked: int
    max_abs_diff: float
    flipped: int
    redis_ping: Step
    sequential: Step
    loaded: Step
    distinct_transactions: int


@dataclass(frozen=True)
class LogSide:
    """One server of the prediction-log comparison: its steps, one per round (bench.serving._measure_log_cost)."""

    health: list[Step]
    sequential: list[Step]
    loaded: list[Step]

    @property
    def health_p50_us(self) -> float:
        return float(np.median([s.p50_us for s in self.health]))

    @property
    def sequential_p50_us(self) -> float:
        return float(np.median([s.p50_us for s in self.sequential]))

    @property
    def loaded_req_per_s(self) -> float:
        return float(np.median([s.req_per_s for s in self.loaded]))


@dataclass(frozen=True)
class LogCost:
    """The prediction log's cost: two Tritons serving the same model files, the log off and on, measured in
    `rounds` alternating rounds (figures: median over rounds); `requests_sent` single-row requests went to the "on"
    server (warm-ups and in-flight drains included) and `rows_logged` rows were read back from its log."""

    rounds: int
    concurrency: int
    off: LogSide
    on: LogSide
    requests_sent: int
    rows_logged: int

    @property
    def sequential_p50_costs_us(self) -> list[float]:
        """Per round: the "on" server's sequential p50 minus the "off" server's, measured back to back."""
        return [on.p50_us - off.p50_us for off, on in zip(self.off.sequential, self.on.sequential, strict=True)]

    @property
    def loaded_costs_pct(self) -> list[float]:
        """Per round: throughput lost at `concurrency` in flight, in % of the "off" server's (negative: "on" was
        faster)."""
        return [(off.req_per_s - on.req_per_s) / off.req_per_s * 100
                for off, on in zip(self.off.loaded, self.on.loaded, strict=True)]

    @property
    def sequential_p50_cost_us(self) -> float:
        """The median of the paired per-round differences (a round's two steps share the machine's conditions)."""
        return float(np.median(self.sequential_p50_costs_us))

    @property
    def loaded_cost_pct(self) -> float:
        return float(np.median(self.loaded_costs_pct))

    def lines(self) -> list[str]:
        off, on = self.off, self.on
        seq, loaded = self.sequential_p50_costs_us, self.loaded_costs_pct
        return [
            f"prediction log off vs on: two Tritons, same model files, {self.rounds} round(s) alternating which goes "
            "first; medians over rounds, cost = median of the paired per-round differences [min..max]:",
            f"  {'':<22}{'off':>10}{'on':>10}   cost",
            f"  {'health p50 us':<22}{off.health_p50_us:>10.1f}{on.health_p50_us:>10.1f}",
            f"  {'sequential p50 us':<22}{off.sequential_p50_us:>10.1f}{on.sequential_p50_us:>10.1f}"
            f"   {self.sequential_p50_cost_us:+.1f} us [{min(seq):+.0f}..{max(seq):+.0f}]",
            f"  {f'c{self.concurrency} req/s':<22}{off.loaded_req_per_s:>10,.0f}{on.loaded_req_per_s:>10,.0f}"
            f"   {self.loaded_cost_pct:+.1f} % lost [{min(loaded):+.1f}..{max(loaded):+.1f}]",
            f"  logged {self.rows_logged:,} rows of {self.requests_sent:,} single-row requests sent to the \"on\" server",
        ]


@dataclass(frozen=True)
class BenchResult:
    """Everything one run measured; `lines()` is the human table, `to_dict()` the JSON."""

    settings: BenchSettings
    floors: list[Floor]
    health: Step
    sequential: Step
    sweep: list[Step]
    batch: Step
    health_loaded: Step
    reference: Step | None
    cpu_count: int
    triton_command: list[str]
    parity_max_abs_diff: float
    perf_analyzer: list[PerfAnalyzerStep] = field(default_factory=list)
    #: Why perf_analyzer's figures are missing and how to get them (None when it ran or was not asked for).
    perf_analyzer_note: str | None = None
    #: The raw-transaction path (None when the run measured the feature-tensor path alone).
    raw: RawPath | None = None
    #: The prediction log's cost (None unless settings.prediction_log is "both").
    log_cost: LogCost | None = None

    def floor(self, runtime: str, rows: int) -> Floor:
        """The floor of `runtime` ("onnxruntime" or "xgboost") on `rows` rows (1 or batch_rows)."""
        return next(f for f in self.floors if f.runtime == runtime and f.rows == rows)

    def sweep_at(self, concurrency: int) -> Step | None:
        return next((s for s in self.sweep if s.concurrency == concurrency), None)

    @property
    def ratios(self) -> dict[str, float]:
        """Served figures against the floors and the bare round trip of the same run."""
        ort1 = self.floor("onnxruntime", 1)
        ortn = self.floor("onnxruntime", self.settings.batch_rows)
        xgbn = self.floor("xgboost", self.settings.batch_rows)
        served_floor = "onnxruntime" if self.settings.target == "python-onnx" else "compiled"  # both: the same forest.so
        served1 = self.floor(served_floor, 1)
        servedn = self.floor(served_floor, self.settings.batch_rows)
        best = max(self.sweep, key=lambda s: s.req_per_s)
        raw = {} if self.raw is None else {
            "raw_sequential_p50_over_health_p50": self.raw.sequential.p50_us / self.health.p50_us,
            "raw_sequential_p50_over_sequential_p50": self.raw.sequential.p50_us / self.sequential.p50_us,
            "redis_ping_p50_over_health_p50": self.raw.redis_ping.p50_us / self.health.p50_us,
        }
        return raw | {
            "sequential_p50_over_health_p50": self.sequential.p50_us / self.health.p50_us,
            "sequential_p50_over_onnxruntime_1_row": self.sequential.p50_us / ort1.p50_us,
            "sequential_p50_over_served_runtime_1_row": self.sequential.p50_us / served1.p50_us,
            "best_sweep_req_per_s_over_health_loaded": best.req_per_s / self.health_loaded.req_per_s,
            "batch_rows_per_s_over_onnxruntime": self.batch.rows_per_s / ortn.rows_per_s,
            "batch_rows_per_s_over_xgboost": self.batch.rows_per_s / xgbn.rows_per_s,
            "batch_rows_per_s_over_served_runtime": self.batch.rows_per_s / servedn.rows_per_s,
        }

    @property
    def targets(self) -> dict[str, dict[str, Any]]:
        """The serving targets (`settings.targets_path`, default bench/targets.toml) against this run's figures."""
        out = {}
        for t in load_targets(self.settings.targets_path or DEFAULT_TARGETS):
            measured = t.measure(self)
            if measured is not None:
                bound = t.max if t.max is not None else t.min
                out[t.name] = {"measured": measured, "target": bound,
                               "met": measured <= bound if t.max is not None else measured >= bound}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "cpu_count": self.cpu_count,
            "triton_command": self.triton_command,
            "parity_max_abs_diff": self.parity_max_abs_diff,
            "floors": [asdict(f) for f in self.floors],
            "health": asdict(self.health),
            "sequential": asdict(self.sequential),
            "sweep": [asdict(s) for s in self.sweep],
            "batch": asdict(self.batch),
            "health_loaded": asdict(self.health_loaded),
            "reference": asdict(self.reference) if self.reference else None,
            "perf_analyzer": [asdict(p) for p in self.perf_analyzer],
            "perf_analyzer_note": self.perf_analyzer_note,
            "raw": asdict(self.raw) if self.raw else None,
            "log_cost": self._log_cost_dict(),
            "ratios": self.ratios,
            "targets": self.targets,
        }

    def _log_cost_dict(self) -> dict[str, Any] | None:
        c = self.log_cost
        if c is None:
            return None
        figures = {f"{side}_{name}": getattr(getattr(c, side), name) for side in ("off", "on")
                   for name in ("health_p50_us", "sequential_p50_us", "loaded_req_per_s")}
        return asdict(c) | figures | {name: getattr(c, name) for name in (
            "sequential_p50_cost_us", "loaded_cost_pct", "sequential_p50_costs_us", "loaded_costs_pct")}

    def lines(self) -> list[str]:
        s, m = self.settings, self.settings.model
        out = [
            f"serving benchmark: {m.trees} trees depth {m.depth}, {m.features} features; {self.cpu_count} CPUs shared "
            f"by server and client ({s.client_processes} process(es), {s.client} client)",
            f"target: {s.target}; config: dynamic_batching={s.serving.dynamic_batching} "
            f"max_queue_delay_us={s.serving.max_queue_delay_us} preferred={list(s.serving.preferred_batch_sizes)} "
            f"instances={s.serving.instance_count}; latency summaries {'on' if s.triton.summary_latencies else 'off'}; "
            f"prediction log {'on' if s.prediction_log == 'on' else 'off'}",
            "in-process floor (1 thread, median):",
        ]
        for f in self.floors:
            out.append(f"  {f.runtime:<12}{f.rows:>5} rows {f.p50_us:>10.1f} us {f.rows_per_s:>12,.0f} rows/s")
        out += ["over gRPC (cli/srv = CPU us per request; queue..out = Triton's us per request; batch = rows per execution):",
                f"{'step':<17}{'conc':>5}{'rows':>5}{'req/s':>9}{'rows/s':>10}{'p50 us':>9}{'p99 us':>9}"
                f"{'cli':>6}{'srv':>6}{'queue':>7}{'in':>6}{'infer':>7}{'out':>6}{'batch':>7}{'fail':>5}"]
        steps = [self.health, self.sequential, *self.sweep, self.batch, self.health_loaded]
        out += [step_line(step) for step in steps + ([self.reference] if self.reference else [])]
        out += [_perf_analyzer_line(p) for p in self.perf_analyzer]
        if self.perf_analyzer_note:
            out.append(f"perf_analyzer: {self.perf_analyzer_note}")
        r = self.ratios
        if self.raw is not None:
            out += self._raw_lines()
        if self.log_cost is not None:
            out += self.log_cost.lines()
        out += [
            f"sequential p50 / bare round trip p50: {r['sequential_p50_over_health_p50']:.2f}x "
            f"(p50 {self.sequential.p50_us:.0f} us, p99 {self.sequential.p99_us:.0f} us)",
            f"best sweep / bare round trip under the same load: {r['best_sweep_req_per_s_over_health_loaded']:.2f}",
            f"{s.batch_rows}-row requests: {self.batch.rows_per_s:,.0f} rows/s = "
            f"{r['batch_rows_per_s_over_onnxruntime']:.2f}x onnxruntime, {r['batch_rows_per_s_over_xgboost']:.2f}x "
            "xgboost in-process (1 thread)",
            "targets: " + ", ".join(f"{k} {'met' if v['met'] else 'NOT met'} ({v['measured']:,.2f})"
                                    for k, v in self.targets.items()),
        ]
        return out

    def _raw_lines(self) -> list[str]:
        """The raw-transaction section: its steps as table rows, then each figure with its target's PASS/MISS."""
        raw, verdicts = self.raw, self.targets
        by_figure = {t.figure: t for t in load_targets(self.settings.targets_path or DEFAULT_TARGETS)}

        def verdict(figure: str) -> str:
            t = by_figure.get(figure)
            if t is None or t.name not in verdicts:
                return ""
            v = verdicts[t.name]
            return f"   target {'<=' if t.max is not None else '>='} {v['target']:,g}: {'PASS' if v['met'] else 'MISS'}"

        seq, loaded = raw.sequential, raw.loaded
        return [
            f"raw transactions: model {raw.model} ({raw.trees} trees), history features from Redis "
            f"({', '.join(raw.history_features)}); every request a new transaction of a backfilled card",
            *(step_line(step) for step in (raw.redis_ping, seq, loaded)),
            f"  backfill: {raw.backfill_rows:,} rows in {raw.backfill_s:.2f} s = {raw.backfill_rows_per_s:,.0f} rows/s"
            + verdict("backfill_rows_per_s"),
            f"  bare round trips, sequential p50/p99: gRPC health {self.health.p50_us:.0f}/{self.health.p99_us:.0f} us, "
            f"Redis PING {raw.redis_ping.p50_us:.0f}/{raw.redis_ping.p99_us:.0f} us",
            f"  1 transaction sequential: p50 {seq.p50_us:.0f} us, p99 {seq.p99_us:.0f} us = "
            f"{seq.p50_us / self.health.p50_us:.2f}x health p50" + verdict("raw_sequential_p50_over_health_p50"),
            f"  {loaded.concurrency} in flight: {loaded.req_per_s:,.0f} txn/s, p50 {loaded.p50_us:.0f} us, "
            f"p99 {loaded.p99_us:.0f} us, {loaded.failures} failed" + verdict("raw_txn_per_s"),
            f"  feature-tensor path, same run: sequential p50 {self.sequential.p50_us:.0f} us; raw / feature-tensor "
            f"{seq.p50_us / self.sequential.p50_us:.2f}x",
            f"  served vs offline features + xgboost: {raw.checked} transactions, max |diff| {raw.max_abs_diff:.2g}, "
            f"{raw.flipped} flipped",
        ]


def _triton_columns(t: TritonStats | None) -> str:
    return (f"{t.queue_us:>7.0f}{t.compute_input_us:>6.0f}{t.compute_infer_us:>7.0f}{t.compute_output_us:>6.0f}"
            f"{t.mean_batch_rows:>7.1f}") if t else f"{'-':>7}{'-':>6}{'-':>7}{'-':>6}{'-':>7}"


def step_line(s: Step) -> str:
    """One row of the table (the header is in `BenchResult.lines`)."""
    tri = _triton_columns(s.triton)
    name = f"{s.name} {s.client}" if s.client == "grpc-aio" else s.name
    return (f"{name:<17}{s.concurrency:>5}{s.rows_per_request:>5}{s.req_per_s:>9,.0f}{s.rows_per_s:>10,.0f}"
            f"{s.p50_us:>9.0f}{s.p99_us:>9.0f}{s.client_cpu_us_per_req:>6.0f}{s.server_cpu_us_per_req:>6.0f}"
            f"{tri}{s.failures:>5}")


def _perf_analyzer_line(p: PerfAnalyzerStep) -> str:
    return (f"{f'perf_analyzer c{p.concurrency}':<17}{p.concurrency:>5}{1:>5}{p.req_per_s:>9,.0f}{p.req_per_s:>10,.0f}"
            f"{p.p50_us:>9.0f}{p.p99_us:>9.0f}{p.client_cpu_us_per_req:>6.0f}{p.server_cpu_us_per_req:>6.0f}"
            f"{_triton_columns(p.triton)}{0:>5}")



def make_step(name: str, client: str, concurrency: int, rows_per_request: int,
              latencies_ns: Sequence[int] | np.ndarray, failures: int, duration_s: float, client_cpu_s: float,
              server_cpu_s: float, triton: TritonStats | None) -> Step:
    """A Step from raw samples; RequestFailedError when nothing completed."""
    lat = np.asarray(latencies_ns, dtype=np.float64) / 1e3
    n = len(lat)
    if n == 0:
        raise RequestFailedError(f"step {name!r} completed no request in {duration_s:.1f}s ({failures} failures)")
    return Step(
        name=name, client=client, concurrency=concurrency, rows_per_request=rows_per_request, requests=n,
        failures=failures, duration_s=duration_s, req_per_s=n / duration_s, rows_per_s=n * rows_per_request / duration_s,
        p50_us=float(np.percentile(lat, 50)), p99_us=float(np.percentile(lat, 99)), mean_us=float(lat.mean()),
        client_cpu_us_per_req=client_cpu_s / n * 1e6, server_cpu_us_per_req=server_cpu_s / n * 1e6, triton=triton,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Verdicts: the targets file


def _sweep(r: BenchResult, t: Target) -> Step | None:
    return r.sweep_at(t.concurrency) if t.concurrency is not None else None


#: The figures a target can bound; None where the run did not measure the step.
FIGURES: dict[str, Callable[[BenchResult, Target], float | None]] = {
    "sequential_p50_over_health_p50": lambda r, t: r.sequential.p50_us / r.health.p50_us,
    "sequential_p50_us": lambda r, t: r.sequential.p50_us,
    "sequential_p99_us": lambda r, t: r.sequential.p99_us,
    "batch_rows_per_s": lambda r, t: r.batch.rows_per_s,
    "sweep_req_per_s": lambda r, t: s.req_per_s if (s := _sweep(r, t)) else None,
    "sweep_p99_us": lambda r, t: s.p99_us if (s := _sweep(r, t)) else None,
    "raw_sequential_p50_over_health_p50": lambda r, t: r.raw.sequential.p50_us / r.health.p50_us if r.raw else None,
    "raw_txn_per_s": lambda r, t: r.raw.loaded.req_per_s if r.raw and t.concurrency in (None, r.raw.loaded.concurrency)
    else None,
    "backfill_rows_per_s": lambda r, t: r.raw.backfill_rows_per_s if r.raw else None,
    "log_cost_sequential_p50_us": lambda r, t: r.log_cost.sequential_p50_cost_us if r.log_cost else None,
    "log_cost_loaded_throughput_pct": lambda r, t: r.log_cost.loaded_cost_pct
    if r.log_cost and t.concurrency in (None, r.log_cost.concurrency) else None,
}


class Target(BaseModel):
    """One `[[target]]` of the targets file: a figure of the run and its bound (`max` or `min`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    figure: Literal[tuple(FIGURES)]  # type: ignore[valid-type]
    max: float | None = None
    min: float | None = None
    concurrency: int | None = None  # the sweep step (figures sweep_*); raw_txn_per_s, log_cost_loaded_*: held only
    # at this concurrency
    batch_rows: int | None = None  # held only by runs whose batch step has this many rows

    @model_validator(mode="after")
    def _one_bound(self) -> Target:
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of max and min")
        if self.figure.startswith("sweep_") and self.concurrency is None:
            raise ValueError(f"figure {self.figure} needs concurrency (the sweep step)")
        return self

    def measure(self, result: BenchResult) -> float | None:
        if self.batch_rows is not None and self.batch_rows != result.settings.batch_rows:
            return None
        return FIGURES[self.figure](result, self)


def load_targets(path: Path) -> list[Target]:
    """The `[[target]]` tables of `path`; SettingsError naming the file and the entry when one is invalid."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"benchmark targets {path}: {exc}; see bench/targets.toml for the format") from exc
    unknown = set(data) - {"target"}
    if unknown:
        raise SettingsError(f"benchmark targets {path}: unknown keys {sorted(unknown)}; only [[target]] tables")
    targets = []
    for i, entry in enumerate(data.get("target", [])):
        try:
            targets.append(Target(**entry))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
            raise SettingsError(f"benchmark targets {path}, target #{i + 1} ({entry.get('name', '?')}): {problems}; "
                                f"figures: {', '.join(FIGURES)}") from None
    return targets
