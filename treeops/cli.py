"""`treeops`: the command line over training, export, server, loadtest and monitoring."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import pydantic
import typer
from typer._click.exceptions import NoArgsIsHelpError  # typer vendors click; its errors live here

from treeops.errors import EXIT_ERROR, CommandInterrupted, InvalidSettingsError, TreeopsError
from treeops.workspace import Workspace

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: figures next to an in-process baseline of the same run.")
app.add_typer(bench_app, name="bench")
features_app = typer.Typer(no_args_is_help=True, help="The online feature store (Redis) behind history features: "
                           "backfill it, show an entity's state.")
app.add_typer(features_app, name="features")
log_app = typer.Typer(no_args_is_help=True, help="The prediction log: ship it to S3, where `treeops monitor "
                      "--log-root s3://...` reads it.")
app.add_typer(log_app, name="log")
log = logging.getLogger("treeops")

WorkspaceOpt = Annotated[
    Path | None, typer.Option("--workspace", envvar="TREEOPS_WORKSPACE", help="root of all state (default: current dir)")
]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="print one JSON object instead of a human summary (on failure: error, kind, exit_code)")]
ModelOpt = Annotated[str, typer.Option("--model-name", help="registered model name")]
GrpcPort = Annotated[int, typer.Option("--grpc-port", help="Triton gRPC port")]
HttpPort = Annotated[int, typer.Option("--http-port", help="Triton HTTP port")]
MetricsPort = Annotated[int, typer.Option("--metrics-port", help="Triton metrics port")]
LogRootOpt = Annotated[str | None, typer.Option(
    "--log-root", help="prediction log: a folder or s3://bucket/prefix (default: <workspace>/prediction_log)")]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    """Polars features -> XGBoost in MLflow -> ONNX -> Triton over gRPC, with load tests and drift checks."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("mlflow", "alembic", "urllib3", "evidently", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _emit(as_json: bool, payload: dict[str, Any], lines: list[str], failure: TreeopsError | None = None) -> None:
    """Print a command's result; with a `failure` (drift, contract violations, a breached SLO) the human lines are
    printed and `failure` is raised carrying `payload`, so `run` prints one JSON error object that includes it."""
    if failure is not None:
        if not as_json:
            for line in lines:
                typer.echo(line)
        raise failure.with_details(payload)
    if as_json:
        typer.echo(json.dumps(payload, indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


@app.command()
def generate(
    rows: Annotated[int, typer.Option(help="number of transactions", min=1)] = 200_000,
    out: Annotated[Path | None, typer.Option(help="output .parquet or .csv (default: <workspace>/data/transactions.parquet)")] = None,
    seed: Annotated[int, typer.Option(help="RNG seed")] = 7,
    drift: Annotated[float, typer.Option(help="0 = training distribution, 1 = strongly shifted", min=0, max=1)] = 0.0,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate seeded card transactions with an `is_fraud` label."""
    import polars as pl

    from training.generate import GenerateSpec, generate_to_file
    from training.ingest import scan_table

    ws = Workspace.resolve(workspace)
    path = out or ws.data_dir / "transactions.parquet"
    generate_to_file(GenerateSpec(rows=rows, seed=seed, drift=drift), path)
    rate = float(scan_table(path).select(pl.col("is_fraud").mean()).collect().item())
    _emit(as_json, {"path": str(path), "rows": rows, "fraud_rate": rate},
          [f"wrote {rows} transactions to {path} (fraud rate {rate:.2%})"])


@app.command()
def train(
    data: Annotated[str, typer.Option(
        help="CSV or Parquet file: a local path or s3://bucket/key (dask: a folder or glob of Parquet files)")],
    target: Annotated[str, typer.Option(help="label column")] = "is_fraud",
    model_name: ModelOpt = "fraud",
    objective: Annotated[str, typer.Option(help="auto, binary, multiclass or regression")] = "auto",
    features: Annotated[str, typer.Option(help="feature spec: auto, columns (every column) or a named spec")] = "auto",
    seed: Annotated[int, typer.Option(help="training seed")] = 7,
    max_rounds: Annotated[int, typer.Option(help="maximum boosting rounds (early stopping may use fewer)")] = 200,
    engine: Annotated[str, typer.Option(help="single (one process) or dask (a Parquet dataset on a Dask cluster)")] = "single",
    scheduler: Annotated[str | None, typer.Option(
        help="dask: address of an existing scheduler (tcp://HOST:8786); without it a local cluster starts")] = None,
    workers: Annotated[int, typer.Option(help="dask: workers of the local cluster", min=1)] = 2,
    partitions: Annotated[int | None, typer.Option(
        help="dask: entity partitions (default: one per worker, more above 5M rows each)", min=1)] = None,
    entity_key: Annotated[str, typer.Option(help="dask: column whose hash partitions the rows")] = "card_id",
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train an XGBoost model, track it in MLflow and register it (first version: champion, then challenger)."""
    from training.engines import check_engine
    from training.pipeline import train_and_register
    from training.train import TrainParams

    check_engine(engine)
    ws = Workspace.resolve(workspace)
    params = TrainParams(objective=objective, seed=seed, num_boost_round=max_rounds)
    if engine == "dask":
        from training.dask_pipeline import train_and_register_dask
        from training.distributed import DaskSettings

        settings = DaskSettings(scheduler=scheduler, workers=workers, partitions=partitions)
        outcome = train_and_register_dask(data, target, model_name, settings=settings, entity_key=entity_key,
                                          params=params, features=features, tracking_uri=ws.tracking_uri,
                                          artifact_root=ws.artifact_root)
    else:
        outcome = train_and_register(data, target, model_name, params=params, features=features,
                                     tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root,
                                     reports_dir=ws.reports_dir)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items() if k != "best_iteration")
    _emit(as_json, outcome.to_dict(), [
        f"registered {model_name} version {outcome.registered.version} as @{outcome.registered.alias} "
        f"(run {outcome.registered.run_id})",
        f"test: {shown} ({int(outcome.metrics['best_iteration']) + 1} trees)",
    ])


@app.command("validate")
def validate_cmd(
    data: Annotated[str, typer.Option(help="CSV or Parquet file: a local path or s3://bucket/key")],
    target: Annotated[str, typer.Option(help="label column")] = "is_fraud",
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a raw data file against the card-transaction data contract; exit 4 when an error rule fails."""
    from training.contract import fraud_contract, validate_file
    from training.errors import ContractViolationError

    Workspace.resolve(workspace)
    report = validate_file(data, fraud_contract(target=target))
    _emit(as_json, report.to_dict(), report.render().splitlines(),
          failure=None if report.passed else ContractViolationError(report))


@app.command("export")
def export_cmd(
    model_name: ModelOpt = "fraud",
    alias: Annotated[str, typer.Option(help="registry alias to export")] = "champion",
    version: Annotated[int | None, typer.Option(help="export this version number instead of the alias")] = None,
    target: Annotated[str | None, typer.Option(
        help="native-compiled (default: tl2cgen forest in treeops' C backend, fastest on CPU, needs gcc; with "
             "--raw-inputs for a spec with history features too), python-onnx (default with --raw-inputs for a "
             "stateless spec), python-compiled, onnxruntime or fil (NGC, GPU)")] = None,
    raw_inputs: Annotated[bool, typer.Option(help="serve raw transaction fields; stateless features run in the graph, "
                                             "history features in Triton from the online store (Redis)")] = False,
    on_store_unavailable: Annotated[str, typer.Option(
        help="raw-transaction model with Redis down: error (UNAVAILABLE naming the store URL) or "
             "score_without_history (history missing, answer flagged treeops_degraded and counted)")] = "error",
    replace: Annotated[bool, typer.Option(help="replace the version if it is on disk with another target or raw "
                                          "inputs (atomic; refused while config.pbtxt serves it)")] = False,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Convert a registered version to ONNX, check parity and write it into the Triton repository."""
    import mlflow

    from export.pipeline import ExportSettings, export_model
    from export.repository import ModelRepository

    ws = Workspace.resolve(workspace)
    mlflow.set_tracking_uri(ws.tracking_uri)
    _stop_on_sigterm()  # SIGTERM cleans up the staging folder as Ctrl-C does
    try:
        result = export_model(model_name, ModelRepository(ws.model_repository), alias=None if version else alias,
                              version=version, settings=ExportSettings(target=target, raw_inputs=raw_inputs,
                                                                       replace=replace,
                                                                       on_store_unavailable=on_store_unavailable))
    except KeyboardInterrupt:
        raise CommandInterrupted("export interrupted; its staging folder was removed and no version was written") from None
    parity = result.parity
    done = ("kept (written by another run meanwhile)" if result.written_by_another_run else "kept"
            if result.already_present else "replaced" if result.replaced else "wrote")
    lines = [f"{done} {result.version_dir} (serving versions {list(result.served_versions)})"]
    if parity:
        lines.append(f"parity: max |diff| {parity.max_abs_diff:.2e} over {parity.rows} rows, "
                     f"{parity.flipped_decisions} flipped decisions")
    _emit(as_json, result.to_dict(), lines)


def _warn_on_registry_drift(ws: Workspace) -> None:
    """Log a warning for each disagreement between the registry and the repository about to be served."""
    import mlflow

    from export.repository import ModelRepository
    from registry.consistency import warn_on_drift

    mlflow.set_tracking_uri(ws.tracking_uri)
    warn_on_drift(ModelRepository(ws.model_repository))


def _triton(ws: Workspace, grpc_port: int, http_port: int, metrics_port: int, binary: Path | None = None, *,
            insecure_admin: bool = False, ephemeral_key: bool = False, online_store_url: str | None = None):
    """The workspace's Triton; `ephemeral_key`: without TREEOPS_TRITON_ADMIN_KEY, a random key for this run;
    `online_store_url`: the Redis its raw-transaction models read (server.store.online_store_url); its Python-backend
    models log what they answer to <workspace>/prediction_log unless TREEOPS_TRITON_PREDICTION_LOG_DIR is set."""
    import secrets

    from server.installation import find_triton
    from server.launcher import TritonServer
    from server.settings import TritonSettings

    settings = TritonSettings(model_repository=ws.model_repository, grpc_port=grpc_port, http_port=http_port,
                              metrics_port=metrics_port, insecure_admin=insecure_admin,
                              online_store_url=online_store_url)
    if settings.prediction_log_dir is None:  # the workspace's log, where `treeops labels` and `monitor` read it
        settings = settings.model_copy(update={"prediction_log_dir": ws.root / "prediction_log"})
    if ephemeral_key and settings.admin_key is None:
        log.info("admin APIs restricted to a key generated for this run; set TREEOPS_TRITON_ADMIN_KEY to choose it")
        settings = settings.model_copy(update={"admin_key": pydantic.SecretStr(secrets.token_urlsafe(32))})
    return TritonServer(settings, find_triton(binary, ws.triton_dir), ws.reports_dir / "triton.log")


@app.command()
def serve(
    grpc_port: GrpcPort = 8001,
    http_port: HttpPort = 8000,
    metrics_port: MetricsPort = 8002,
    triton_binary: Annotated[Path | None, typer.Option(help="tritonserver binary (default: TRITONSERVER_PATH, NGC, wheel)")] = None,
    timeout_s: Annotated[float, typer.Option(help="seconds to wait for readiness")] = 120,
    insecure_admin: Annotated[bool, typer.Option(help="start without TREEOPS_TRITON_ADMIN_KEY: admin APIs open to all")] = False,
    liveness_interval_s: Annotated[float | None, typer.Option(help="seconds between liveness checks (default 5)")] = None,
    liveness_failures: Annotated[int | None, typer.Option(help="failed checks in a row that stop serve (default 3)")] = None,
    workspace: WorkspaceOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="when ready, print one JSON line: ports, urls, pid and the served model versions")] = False,
) -> None:
    """Run Triton on the workspace's model repository in the foreground until SIGINT/SIGTERM.

    Raw-transaction models read their history from TREEOPS_ONLINE_STORE_URL; unset, a local redis-server
    runs in the workspace while serving. Exits non-zero when tritonserver dies or stops answering `/v2/health/live`.
    """
    from server.settings import SupervisionSettings
    from server.store import online_store_url

    ws = Workspace.resolve(workspace)
    overrides = {k: v for k, v in (("liveness_interval_s", liveness_interval_s),
                                   ("liveness_failures", liveness_failures)) if v is not None}
    supervision = SupervisionSettings(**overrides)
    _warn_on_registry_drift(ws)
    _stop_on_sigterm()
    with online_store_url(ws.root, ws.model_repository) as store_url:
        server = _triton(ws, grpc_port, http_port, metrics_port, triton_binary, insecure_admin=insecure_admin,
                         online_store_url=store_url)
        _supervise(server, ws, supervision, timeout_s, as_json)


def _supervise(server, ws: Workspace, supervision, timeout_s: float, as_json: bool) -> None:
    """Start `server`, announce it, and supervise it until it exits or SIGINT/SIGTERM; always stopped."""
    try:
        server.start(timeout_s=timeout_s)
        s = server.settings
        if as_json:
            typer.echo(json.dumps({
                "ready": True, "pid": server.pid, "grpc_port": s.grpc_port, "http_port": s.http_port,
                "metrics_port": s.metrics_port, "grpc_url": s.grpc_url, "http_url": s.http_url,
                "metrics_url": s.metrics_url, "model_repository": str(ws.model_repository),
                "models": _served_models(ws.model_repository)}), nl=True)
            sys.stdout.flush()
        else:
            typer.echo(f"serving {ws.model_repository}: gRPC {s.grpc_url}, HTTP {s.http_url}, "
                       f"metrics {s.metrics_url} (Ctrl-C to stop)")
        server.supervise(supervision)
    except KeyboardInterrupt:
        typer.echo("stopping Triton", err=as_json)  # with --json, stdout holds only the ready line
    finally:
        server.stop()


def _served_models(repository: Path) -> dict[str, int]:
    """Each model of the repository with a config, and the champion version it serves."""
    from server.repository_view import served_version

    dirs = sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file()) if repository.is_dir() else []
    return {p.name: served_version(repository, p.name) for p in dirs}


@app.command()
def score(
    data: Annotated[Path | None, typer.Option(help="raw transactions (default: <workspace>/data/current.parquet)")] = None,
    rows: Annotated[int, typer.Option(help="score the first N rows", min=1)] = 5,
    model_name: ModelOpt = "fraud",
    grpc_url: Annotated[str, typer.Option("--triton-url", "--grpc-url",
                                          help="gRPC address of the running Triton (--grpc-url: the old spelling)")
                        ] = "127.0.0.1:8001",
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score raw transactions over gRPC with the inputs the served model's signature names (features or raw fields)."""
    from server.client import ScoringClient
    from server.repository_view import served_features
    from training.ingest import load_raw

    ws = Workspace.resolve(workspace)
    path = data or ws.data_dir / "current.parquet"
    _, features = served_features(ws.model_repository, model_name)
    raw = load_raw(path, features.spec.raw_schema).head(rows).collect()
    with ScoringClient(grpc_url, model_name) as client:
        signature = client.served_signature()
        scores = client.score_raw(features, raw)
    ids = raw["transaction_id"].to_list()
    probs = scores.positive.tolist()
    _emit(as_json, {"model_version": scores.model_version, "signature": signature.to_dict(), "transaction_id": ids,
                    "probability": probs},
          [f"model {model_name} version {scores.model_version} ({signature.describe()}) answered:"]
          + [f"  transaction {i}: p(fraud) = {p:.5f}" for i, p in zip(ids, probs)])


@app.command()
def loadtest(
    duration_s: Annotated[int, typer.Option("--duration-s", help="seconds of traffic", min=1)] = 30,
    users: Annotated[int, typer.Option(help="concurrent closed-loop users", min=1)] = 16,
    protocol: Annotated[list[str], typer.Option(help="grpc and/or http (repeat the option)")] = ["grpc"],
    slo: Annotated[Path | None, typer.Option(help="SLO file (.toml/.json): p50_ms, p95_ms, p99_ms, max_error_rate, min_rps")] = None,
    p99_ms: Annotated[float | None, typer.Option("--p99-ms", help="p99 budget in ms (overrides the file)")] = None,
    max_error_rate: Annotated[float | None, typer.Option(help="error-rate budget (overrides the file)")] = None,
    data: Annotated[Path | None, typer.Option(
        help="raw transactions the rows come from (default: data/current.parquet, else the served version's raw holdout)")] = None,
    model_name: ModelOpt = "fraud",
    grpc_url: Annotated[str, typer.Option("--triton-url", "--grpc-url",
                                          help="gRPC address of the running Triton (--grpc-url: the old spelling)")
                        ] = "127.0.0.1:8001",
    http_url: Annotated[str, typer.Option(help="Triton HTTP address")] = "127.0.0.1:8000",
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Locust against a running Triton, requests built from the served model's signature; prints the SLO verdict
    (and the most frequent errors of failed requests) and exits 1 on any breach."""
    import mlflow

    from loadtest.pipeline import loadtest_served_model

    ws = Workspace.resolve(workspace)
    current = ws.data_dir / "current.parquet"
    mlflow.set_tracking_uri(ws.tracking_uri)  # for the raw holdout when there is no data file
    result = loadtest_served_model(
        ws.model_repository, model_name, data or (current if current.is_file() else None), ws.reports_dir / "loadtest",
        grpc_url=grpc_url, http_url=http_url, protocols=tuple(protocol), users=users, duration_s=duration_s,
        slo_file=slo, overrides={"p99_ms": p99_ms, "max_error_rate": max_error_rate},
    )
    from loadtest.errors import SLOBreachError
    from loadtest.runner import render_verdict

    _emit(as_json, result_summary(result), [render_verdict(result)],
          failure=None if result.passed else SLOBreachError.of(result))


def result_summary(result) -> dict[str, Any]:
    a = result.aggregate
    return {"passed": result.passed, "requests": a.requests, "failures": a.failures, "rps": a.rps,
            "p50_ms": a.p50_ms, "p95_ms": a.p95_ms, "p99_ms": a.p99_ms,
            "checks": [c.__dict__ for c in result.checks], "errors": [e.__dict__ for e in result.errors],
            "html_report": str(result.html_report),
            "stats_csv": str(result.stats_csv)}


@app.command()
def drift(
    current: Annotated[Path | None, typer.Option(help="batch to check (default: <workspace>/data/current.parquet)")] = None,
    reference: Annotated[Path | None, typer.Option(help="training reference (default: <workspace>/data/train.parquet)")] = None,
    name: Annotated[str, typer.Option(help="report file name (without extension)")] = "drift",
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evidently drift report of a batch's features against the training reference; exit 3 on drift."""
    from monitoring.drift import run_drift_report
    from monitoring.errors import DriftDetectedError
    from training.features import FRAUD_FEATURES
    from training.ingest import load_raw

    ws = Workspace.resolve(workspace)
    spec = FRAUD_FEATURES
    frames = [spec.compute(load_raw(p, spec.raw_schema)).collect()
              for p in (reference or ws.data_dir / "train.parquet", current or ws.data_dir / "current.parquet")]
    result = run_drift_report(frames[0], frames[1], spec.names, ws.reports_dir, name=name, categorical=spec.categorical)
    verdict = "DRIFT DETECTED" if result.drift_detected else "no drift"
    failure = DriftDetectedError(f"drift detected: {result.drifted_columns} of {result.total_columns} features of "
                                 f"the batch drifted from the training reference; report: {result.html_path}")
    _emit(as_json, result.to_dict(), [
        f"{verdict}: {result.drifted_columns} of {result.total_columns} features drifted",
        f"report: {result.html_path}",
    ], failure=failure if result.drift_detected else None)


@app.command("labels")
def labels_cmd(
    data: Annotated[Path, typer.Option(help="CSV or Parquet with columns transaction_id, label (0/1), labelled_at "
                                            "(ISO 8601; no offset: UTC)")],
    model_name: Annotated[str, typer.Option("--model-name", "--model", help="model whose logged predictions the "
                                            "ids are checked against")] = "fraud",
    log_root: LogRootOpt = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store ground truth that arrived later (<workspace>/labels); the latest label per transaction wins. Ids no
    logged prediction of the model carries are stored too, and counted."""
    import datetime as dt

    from monitoring.labels import ingest_labels
    from monitoring.monitor import MonitorPaths
    from monitoring.prediction_log import read_window

    ws = Workspace.resolve(workspace)
    paths = MonitorPaths.in_workspace(ws.root, model_name, log_root)
    logged = read_window(paths.log_root, model_name, dt.datetime(1970, 1, 1, tzinfo=dt.UTC), dt.datetime.now(dt.UTC))
    result = ingest_labels(data, paths.labels_dir, logged["transaction_id"].drop_nulls())
    examples = f" (e.g. {', '.join(result.unknown_examples)})" if result.unknown_ids else ""
    _emit(as_json, result.to_dict(), [
        f"stored {result.stored:,} labels from {data} in {result.path} ({result.duplicates:,} duplicate rows: "
        "the latest labelled_at kept)",
        f"{result.unknown_ids:,} transaction ids are in no logged prediction of {model_name} in {paths.log_root}"
        + examples,
    ])


@app.command()
def monitor(
    window: Annotated[str, typer.Option(help="length of the window ending at --end: 1h, 30m, 1h30m, 2d")] = "1h",
    end: Annotated[str | None, typer.Option(help="end of the window, ISO 8601 (no offset: UTC; default now)")] = None,
    model_name: Annotated[str, typer.Option("--model-name", "--model", help="served model")] = "fraud",
    version: Annotated[int | None, typer.Option(help="only this version (default: every version logged)")] = None,
    log_root: LogRootOpt = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Drift and (where labels arrived) quality of a window of served traffic against each version's training
    reference; reports in <workspace>/reports/monitor, the Evidently UI workspace in <workspace>/evidently, gauges in
    <workspace>/metrics. Exit 5 quality drop, 3 drift, 6 too little data for a verdict, 0 all checked and fine."""
    from monitoring.errors import DriftDetectedError
    from monitoring.monitor import (InsufficientDataError, MonitorPaths, MonitorSettings, QualityDropError, parse_end,
                                    parse_window, run_monitor)
    from treeops.errors import EXIT_DRIFT, EXIT_NO_DATA, EXIT_QUALITY

    ws = Workspace.resolve(workspace)
    stop = parse_end(end)
    start = stop - parse_window(window)
    result = run_monitor(model_name, start, stop, MonitorPaths.in_workspace(ws.root, model_name, log_root),
                         version=version, settings=MonitorSettings())
    failures = {
        EXIT_QUALITY: QualityDropError(f"quality drop: version(s) {[v.version for v in result.versions if v.quality_dropped]} "
                                       f"of {model_name} scored below their holdout bounds on labelled traffic"),
        EXIT_DRIFT: DriftDetectedError(f"drift detected: version(s) "
                                       f"{[v.version for v in result.versions if v.drift and v.drift.drift_detected]} "
                                       f"of {model_name} drifted from their training reference"),
        EXIT_NO_DATA: InsufficientDataError("too little data for a verdict: " + "; ".join(
            why for v in result.versions for why in v.skipped)),
    }
    _emit(as_json, result.to_dict(), result.lines(), failure=failures.get(result.exit_code))


@app.command()
def retrain(
    window: Annotated[str, typer.Option(help="served traffic of this long before --end: 7d, 24h, 1d12h")] = "7d",
    end: Annotated[str | None, typer.Option(help="end of the window, ISO 8601 (no offset: UTC; default now)")] = None,
    data: Annotated[Path | None, typer.Option(help="train on this raw file (CSV or Parquet) instead of the log")] = None,
    trigger: Annotated[str | None, typer.Option(help="why, recorded as lineage: the monitor verdict's id")] = None,
    model_name: Annotated[str, typer.Option("--model-name", "--model", help="registered model")] = "fraud",
    log_root: LogRootOpt = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a challenger with the champion's parameters on the window's logged predictions joined with their labels
    (features as served), or on --data; registers it as @challenger with lineage.* tags. Exit 6 too few labels or a
    class too rare, 1 no champion or bad input, 4 a --data file that breaks the data contract: nothing registered."""
    from monitoring.monitor import MonitorPaths, parse_end, parse_window
    from retraining.retrain import RetrainSettings, retrain_from_file, retrain_from_log

    ws = Workspace.resolve(workspace)
    if data is not None:
        outcome = retrain_from_file(model_name, data, tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root,
                                    reports_dir=ws.reports_dir, trigger=trigger)
    else:
        stop = parse_end(end)
        outcome = retrain_from_log(model_name, stop - parse_window(window), stop,
                                   MonitorPaths.in_workspace(ws.root, model_name, log_root),
                                   tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root, trigger=trigger,
                                   settings=RetrainSettings())
    shown = ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items() if k != "best_iteration")
    lineage = outcome.lineage
    source = (f"{lineage['rows']} labelled predictions from {lineage['window_start']} to {lineage['window_end']}"
              if lineage["source"] == "prediction_log" else lineage["data"])
    _emit(as_json, outcome.to_dict(), [
        f"registered {model_name} version {outcome.registered.version} as @{outcome.registered.alias} "
        f"(run {outcome.registered.run_id}), trained with version {lineage['champion_version']}'s parameters",
        f"on {source}; trigger {lineage['trigger']}",
        f"test: {shown}",
    ])


TritonUrlOpt = Annotated[
    str | None, typer.Option("--triton-url", help="gRPC address of a running Triton to switch live (explicit mode)")
]
RetainOpt = Annotated[int, typer.Option("--retain", min=0, help="exported versions without an alias kept on disk")]


def _model_control(url: str | None):
    from server.admin import model_control

    return model_control(url)


def _rollout(ws: Workspace, model_name: str, triton_url: str | None, retain: int,
             target: str | None = None, instance_kind: str | None = None):
    import mlflow

    from export.pipeline import ExportSettings
    from export.repository import ModelRepository
    from registry.sync import SyncSettings, served_export
    from export.triton_config import ServingSettings
    from registry.rollout import rollout

    mlflow.set_tracking_uri(ws.tracking_uri)
    repo = ModelRepository(ws.model_repository)
    serving = ServingSettings(instance_kind=instance_kind) if instance_kind else ServingSettings()
    served = served_export(repo, model_name)
    export = ExportSettings(**(served if target is None else {"target": target}), serving=serving)
    return rollout(model_name, repo, _model_control(triton_url), SyncSettings(retain_versions=retain, export=export))


@app.command()
def sync(
    model_name: ModelOpt = "fraud",
    triton_url: TritonUrlOpt = None,
    retain: RetainOpt = 2,
    target: Annotated[str | None, typer.Option(help="export target (default: what the repository serves, else native-compiled)")] = None,
    instance_kind: Annotated[str | None, typer.Option(help="cpu or gpu model instances (gpu for GPU nodes)")] = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make the Triton repository mirror the registry (aliases exported, champion served); idempotent."""
    ws = Workspace.resolve(workspace)
    _stop_on_sigterm()
    result = _rollout(ws, model_name, triton_url, retain, target, instance_kind)
    _emit(as_json, result.to_dict(), [
        f"{model_name}: serving {list(result.served)}; aliases {result.aliases}; exported {list(result.exported)}; "
        f"pruned {list(result.pruned)}" + ("; Triton switched" if triton_url else ""),
    ])


@app.command()
def promote(
    model_name: ModelOpt = "fraud",
    metric: Annotated[str | None, typer.Option(help="holdout metric compared (default: roc_auc, or rmse)")] = None,
    margin: Annotated[float, typer.Option(help="minimum improvement of the challenger")] = 0.0,
    force: Annotated[bool, typer.Option(help="promote even without the improvement (recorded)")] = False,
    reason: Annotated[str, typer.Option(help="why, for the audit log")] = "",
    allow_signature_change: Annotated[bool, typer.Option(
        help="promote a challenger whose inputs/outputs differ from the served model's (clients must switch too)")] = False,
    triton_url: TritonUrlOpt = None,
    retain: RetainOpt = 2,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move `challenger` to `champion` if it beats it on the holdout and passes parity; then sync.

    If the sync or the Triton switch fails, the aliases are left exactly as before the command.
    """
    import mlflow

    from registry.promotion import AuditLog, promote as promote_version
    from export.repository import ModelRepository

    ws = Workspace.resolve(workspace)
    mlflow.set_tracking_uri(ws.tracking_uri)
    _stop_on_sigterm()
    event, result = promote_version(model_name, ModelRepository(ws.model_repository), AuditLog(ws.audit_log),
                                    metric=metric, margin=margin, force=force, reason=reason,
                                    allow_signature_change=allow_signature_change,
                                    deploy=lambda: _rollout(ws, model_name, triton_url, retain))
    m, metric = event.metrics, event.metric
    _emit(as_json, {"event": event.to_dict(), "sync": result.to_dict()}, [
        f"promoted {model_name} version {event.to_version} to champion (was {event.from_version})"
        + (" [forced]" if event.forced else ""),
        f"{metric}: champion {m['champion'][metric]:.5f} -> challenger {m['challenger'][metric]:.5f}",
        f"serving {list(result.served)}",
    ])


@app.command()
def rollback(
    model_name: ModelOpt = "fraud",
    reason: Annotated[str, typer.Option(help="why, for the audit log")] = "",
    triton_url: TritonUrlOpt = None,
    retain: RetainOpt = 2,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Point `champion` back at the previous champion; then sync."""
    import mlflow

    from registry.promotion import AuditLog, rollback as rollback_version

    ws = Workspace.resolve(workspace)
    mlflow.set_tracking_uri(ws.tracking_uri)
    _stop_on_sigterm()
    event, result = rollback_version(model_name, AuditLog(ws.audit_log), reason=reason,
                                     deploy=lambda: _rollout(ws, model_name, triton_url, retain))
    _emit(as_json, {"event": event.to_dict(), "sync": result.to_dict()}, [
        f"rolled {model_name} champion back from version {event.from_version} to {event.to_version}",
        f"serving {list(result.served)}",
    ])


@app.command("loop")
def loop_cmd(
    once: Annotated[bool, typer.Option("--once", help="run one pass and exit (the only mode: schedule it with cron, "
                                       "the Kubernetes CronJob or Prefect)")] = False,
    window: Annotated[str, typer.Option(help="traffic monitored and trained on, ending at --end: 7d, 24h")] = "7d",
    gate_window: Annotated[str, typer.Option(help="newest part of --window the challenger is shadowed and judged "
                                             "on, not trained on")] = "1d",
    end: Annotated[str | None, typer.Option(help="end of the windows, ISO 8601 (no offset: UTC; default now)")] = None,
    margin: Annotated[float | None, typer.Option(help="ROC AUC the challenger must add (default TREEOPS_GATE_MARGIN "
                                                 "or 0.001)")] = None,
    slo: Annotated[Path | None, typer.Option(help="SLO file of the gate's Locust run (default: p99 120 ms, no "
                                             "failed request)")] = None,
    slo_duration_s: Annotated[int | None, typer.Option("--slo-duration-s", help="seconds of the gate's Locust run "
                                                       "(default 5)")] = None,
    model_name: Annotated[str, typer.Option("--model-name", "--model", help="served model")] = "fraud",
    triton_url: TritonUrlOpt = None,
    retain: RetainOpt = 2,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """First, a champion this loop promoted is judged on the labelled traffic it served since: if the champion it
    replaced, shadowed on that traffic, beats it by TREEOPS_LOOP_ROLLBACK_MARGIN (ROC AUC, default 0.005), roll
    back with a live switch and stop. Else monitor the window; on drift or a quality drop retrain a challenger,
    export it (parity), shadow it on the newest traffic, gate it (ROC AUC margin, Locust SLO against it loaded in
    Triton) and promote it with a live switch. Prints what it decided and why; every step goes to the audit log.
    Exit 0 nothing to do, promoted or rolled back, 6 too little data, 1 refused or another loop holds
    <workspace>/loop.lock."""
    from monitoring.monitor import parse_end, parse_window
    from retraining.gate import GateSettings
    from retraining.loop import LoopRefused, LoopSettings, run_loop_once

    if not once:
        raise InvalidSettingsError("`treeops loop` runs only with --once (one pass); schedule it with cron, the "
                                   "Kubernetes CronJob or the Prefect flow")
    ws = Workspace.resolve(workspace)
    _stop_on_sigterm()
    gate = GateSettings(**{k: v for k, v in (("margin", margin), ("slo_file", slo), ("slo_duration_s", slo_duration_s))
                           if v is not None})
    settings = LoopSettings(window=parse_window(window), gate_window=parse_window(gate_window), retain_versions=retain,
                            gate=gate)
    control = _model_control(triton_url)
    outcome = run_loop_once(model_name, parse_end(end), ws, settings, triton=control, grpc_url=triton_url)
    failure = None
    if outcome.decision == "refused":
        failure = LoopRefused(f"challenger refused: {outcome.reason}; nothing was promoted")
    elif outcome.decision == "too_little_data":
        from monitoring.monitor import InsufficientDataError

        failure = InsufficientDataError(f"too little data: {outcome.reason}; nothing was promoted")
    _emit(as_json, outcome.to_dict(), outcome.lines(), failure=failure)


@app.command()
def models(
    model_name: ModelOpt = "fraud",
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List registered versions with their aliases and key metrics, and any drift from the model repository."""
    import mlflow

    from export.repository import ModelRepository
    from registry.consistency import check
    from registry.versions import list_versions

    ws = Workspace.resolve(workspace)
    mlflow.set_tracking_uri(ws.tracking_uri)
    rows = list_versions(model_name)
    drift = check(model_name, ModelRepository(ws.model_repository))
    lines = [f"{'version':>7}  {'aliases':<22} {'roc_auc':>8} {'pr_auc':>8} {'log_loss':>9}  run"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<22} {m.get('roc_auc', float('nan')):>8.4f} "
                     f"{m.get('pr_auc', float('nan')):>8.4f} {m.get('log_loss', float('nan')):>9.4f}  {r['run_id']}")
    lines.append(f"repository serves {list(drift.served) or 'nothing'}; on disk {list(drift.on_disk)}")
    lines += [f"drift: {problem}" for problem in drift.problems]
    _emit(as_json, {"model_name": model_name, "versions": rows, "repository": drift.to_dict()}, lines)


@app.command()
def demo(
    rows: Annotated[int, typer.Option(help="training rows to generate", min=1000)] = 200_000,
    grpc_port: GrpcPort = 8001,
    http_port: HttpPort = 8000,
    metrics_port: MetricsPort = 8002,
    loadtest_s: Annotated[int, typer.Option(help="seconds of Locust load", min=1)] = 10,
    keep_serving: Annotated[bool, typer.Option(help="leave Triton serving in the foreground at the end")] = False,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate, train, register, export, serve, score, load-test, then serve drifted traffic and run the loop once
    (retrain, shadow, gate, promote: version 2 serves at the end) and check drift, end to end."""
    from online_store.redis_server import workspace_store
    from online_store.settings import OnlineStoreSettings
    from treeops.demo import DemoSettings, run_demo, serve_until_stopped

    ws = Workspace.resolve(workspace)
    settings = DemoSettings(rows=rows, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                            loadtest_s=loadtest_s, keep_serving=keep_serving)
    if keep_serving:
        _stop_on_sigterm()
    with workspace_store(ws.root, OnlineStoreSettings().url) as store_url:
        server = _triton(ws, grpc_port, http_port, metrics_port, ephemeral_key=True, online_store_url=store_url)
        summary = run_demo(ws, settings, server, store_url)
        _emit(as_json, summary.to_dict(), summary.lines())
        if keep_serving:  # the summary (version, ports, figures) first, then serve in the foreground
            sys.stdout.flush()
            serve_until_stopped(server)


@bench_app.command("training")
def bench_training(
    rows: Annotated[int, typer.Option(help="transactions to generate and train on", min=1000)] = 10_000_000,
    max_rounds: Annotated[int, typer.Option(help="boosting rounds at most")] = 100,
    engine: Annotated[str, typer.Option(help="single (one process) or dask (a local cluster of --workers)")] = "single",
    workers: Annotated[int, typer.Option(help="dask: workers of the local cluster", min=1)] = 2,
    partitions: Annotated[int | None, typer.Option(help="dask: entity partitions (default: one per worker, more "
                                                        "above 5M rows each)", min=1)] = None,
    reference_rows: Annotated[int, typer.Option(help="dask: also the single-process engine on this many rows, "
                                                     "in the same run (0: none)", min=0)] = 10_000_000,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate N rows, compute features and train; rows/s for each step and the peak memory
    (generated data in the workspace's data folder is reused by the dask engine)."""
    from bench.training import run_dask_benchmark_with_reference, run_training_benchmark
    from training.engines import check_engine

    check_engine(engine)
    ws = Workspace.resolve(workspace)
    if engine == "dask":
        result = run_dask_benchmark_with_reference(rows, ws.data_dir, reference_rows, workers=workers,
                                                   max_rounds=max_rounds, partitions=partitions)
    else:
        result = run_training_benchmark(rows, ws.data_dir, max_rounds=max_rounds)
    _emit(as_json, result.to_dict(), result.lines())


@bench_app.command("monitor")
def bench_monitor(
    rows: Annotated[int, typer.Option(help="logged predictions in the monitored hour", min=1000)] = 1_000_000,
    labelled_share: Annotated[float, typer.Option(help="share of them with a label", min=0, max=1)] = 0.5,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """`treeops monitor --window 1h` over N logged predictions (log, labels and reference set up first, not timed)."""
    from bench.monitor import run_monitor_benchmark

    ws = Workspace.resolve(workspace)
    result = run_monitor_benchmark(rows, ws.root / "bench_monitor", labelled_share=labelled_share)
    _emit(as_json, result.to_dict(), result.lines())


@bench_app.command("serving")
def bench_serving(
    out: Annotated[Path | None, typer.Option(help="JSON report (default: <workspace>/reports/bench_serving.json)")] = None,
    trees: Annotated[int, typer.Option(min=1)] = 200,
    depth: Annotated[int, typer.Option(min=1)] = 6,
    features: Annotated[int, typer.Option(min=1)] = 30,
    target: Annotated[str, typer.Option(help="export target that serves it, as `treeops export --target` names it: "
                                            "native-compiled (tl2cgen forest in treeops' C backend), python-compiled "
                                            "(the same forest in the Python backend) or python-onnx (ONNX Runtime in "
                                            "the Python backend); the compiled ones need gcc")] = "native-compiled",
    concurrency: Annotated[str, typer.Option(help="comma-separated closed-loop levels")] = "1,2,4,8,16,32,64",
    step_s: Annotated[float, typer.Option(min=0.1, help="seconds per sweep step")] = 3.0,
    requests: Annotated[int, typer.Option(min=1, help="sequential calls for the latency steps")] = 2000,
    batch_rows: Annotated[int, typer.Option(min=1)] = 256,
    batch_concurrency: Annotated[int, typer.Option(min=1)] = 8,
    client_processes: Annotated[int, typer.Option(min=1)] = 1,
    max_queue_delay_us: Annotated[int | None, typer.Option(help="override the dynamic batcher delay")] = None,
    instance_count: Annotated[int | None, typer.Option(min=1, help="override the model instances")] = None,
    dynamic_batching: Annotated[bool, typer.Option(help="dynamic batcher on (default) or Triton's default scheduler")] = True,
    summary_latencies: Annotated[bool, typer.Option(help="Triton's p50..p999 latency summaries (off by default: costly)")] = False,
    perf_analyzer: Annotated[bool, typer.Option(help="also drive NVIDIA perf_analyzer when installed (make perf-analyzer)")] = True,
    perf_analyzer_concurrency: Annotated[str, typer.Option(help="comma-separated perf_analyzer levels")] = "1,32",
    perf_analyzer_path: Annotated[Path | None, typer.Option(help="perf_analyzer binary (default: TREEOPS_PERF_ANALYZER, "
                                                                 "<venv>/perf_analyzer, PATH)")] = None,
    targets: Annotated[Path | None, typer.Option(help="serving targets TOML (default: bench/targets.toml)")] = None,
    raw_transactions: Annotated[bool, typer.Option(help="also the raw-transaction path: the fraud model on raw fields "
                                                        "with its history in a Redis of the run (needs redis-server)")] = True,
    raw_rows: Annotated[int, typer.Option(min=1000, help="transactions the raw model trains on and Redis is "
                                                         "backfilled with")] = 200_000,
    raw_max_txn_per_s: Annotated[int, typer.Option(min=1, help="rate the distinct raw transactions are serialized for "
                                                               "(none is sent twice)")] = 30_000,
    raw_target: Annotated[str | None, typer.Option(help="export target of the raw-transaction model (default: what "
                                                        "`treeops export --raw-inputs` uses)")] = None,
    prediction_log: Annotated[str, typer.Option(help="off, on (the whole run with the prediction log) or both (also "
                                                    "a second Triton with the log on: the log's cost, off vs on)")] = "off",
    log_rounds: Annotated[int, typer.Option(min=1, help="alternating off/on rounds of --prediction-log both")] = 3,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve a 200-tree forest on a real Triton: latency, throughput and overhead next to in-process floors; with the
    raw-transaction path (default) the fraud model on raw fields, its history in Redis, in the same run."""
    from export.triton_config import ServingSettings
    from bench.errors import SettingsError
    from bench.model import BenchModelSpec
    from bench.serving import BenchSettings, run_serving_benchmark
    from bench.settings import RawBenchSpec
    from server.settings import TritonSettings

    ws = Workspace.resolve(workspace)
    overrides = {k: v for k, v in (("max_queue_delay_us", max_queue_delay_us), ("instance_count", instance_count))
                 if v is not None} | {"dynamic_batching": dynamic_batching}

    def levels(flag: str, text: str) -> tuple[int, ...]:
        try:
            return tuple(int(c) for c in text.split(","))
        except ValueError:
            raise SettingsError(f"{flag} {text!r}: give comma-separated integers, e.g. 1,8,32") from None

    settings = BenchSettings(
        model=BenchModelSpec(trees=trees, depth=depth, features=features), target=target,
        serving=ServingSettings(**overrides), concurrency=levels("--concurrency", concurrency),
        step_s=step_s, sequential_requests=requests, health_requests=requests, batch_rows=batch_rows,
        batch_concurrency=batch_concurrency, client_processes=client_processes,
        triton=TritonSettings(summary_latencies=summary_latencies), perf_analyzer=perf_analyzer,
        perf_analyzer_concurrency=levels("--perf-analyzer-concurrency", perf_analyzer_concurrency),
        perf_analyzer_path=perf_analyzer_path, targets_path=targets,
        raw=RawBenchSpec(rows=raw_rows, max_txn_per_s=raw_max_txn_per_s, target=raw_target) if raw_transactions else None,
        prediction_log=prediction_log, log_rounds=log_rounds,  # type: ignore[arg-type]  # checked by BenchSettings
    )
    result = run_serving_benchmark(settings, out_path=out or ws.reports_dir / "bench_serving.json")
    _emit(as_json, result.to_dict(), result.lines())


@features_app.command("backfill")
def features_backfill(
    data: Annotated[Path, typer.Option(help="historical transactions (CSV or Parquet) with the spec's raw fields")],
    model_name: Annotated[str, typer.Option("--model-name", "--model", help="served model whose feature spec "
                                            "declares the history features")] = "fraud",
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Load each entity's history from past transactions (timestamp order), so its first live one sees it.
    Store: TREEOPS_ONLINE_STORE_URL, else the workspace's redis-server (started for the command if not running)."""
    from online_store.backfill import backfill
    from online_store.redis_server import workspace_store
    from online_store.settings import OnlineStoreSettings
    from server.repository_view import served_features
    from training.ingest import load_raw

    ws = Workspace.resolve(workspace)
    version, fitted = served_features(ws.model_repository, model_name)
    load_raw(data, fitted.spec.raw_schema)  # a missing or unreadable file fails before any store is started
    with workspace_store(ws.root, OnlineStoreSettings().url) as url:
        result = backfill(url, fitted, data)
    _emit(as_json, {"model_version": version, **result.to_dict()}, result.lines())  # the URL without its password


@features_app.command("show")
def features_show(
    entity: Annotated[str, typer.Option(help="ENTITY=VALUE, e.g. card_id=123")],
    at: Annotated[str | None, typer.Option(help="time of the next transaction, ISO 8601, UTC (default: now)")] = None,
    value: Annotated[list[str], typer.Option("--value", help="NAME=X of the next transaction, e.g. amount=42.5 "
                                             "(ratios to a mean need it; default NaN)")] = [],
    model_name: Annotated[str, typer.Option("--model-name", "--model", help="served model whose feature spec "
                                            "declares the history features")] = "fraud",
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print an entity's stored history and the features its next transaction would get (changes nothing)."""
    from online_store.redis_server import workspace_store
    from online_store.settings import OnlineStoreSettings
    from online_store.show import check_entity, parse_pair, parse_time_us, parse_values, show
    from server.repository_view import served_features

    ws = Workspace.resolve(workspace)
    _, fitted = served_features(ws.model_repository, model_name)
    name, key = parse_pair(entity, "--entity")
    check_entity(fitted, name)
    values = parse_values(value)
    with workspace_store(ws.root, OnlineStoreSettings().url) as url:
        state = show(url, fitted, key, at_us=parse_time_us(at) if at else None, values=values)
    _emit(as_json, {"store_url": url, **state.to_dict()}, state.lines())


@log_app.command("ship")
def log_ship(
    to: Annotated[str, typer.Option(help="s3://bucket/prefix the log is copied under (same relative keys)")],
    log_root: Annotated[Path | None, typer.Option(help="local prediction log (default: <workspace>/prediction_log)")]
    = None,
    interval_s: Annotated[float, typer.Option("--interval", help="seconds between passes, until SIGTERM/SIGINT "
                                              "(then a last pass)", min=0.1)] = 30.0,
    once: Annotated[bool, typer.Option(help="one pass, then exit (1 if a segment was not shipped)")] = False,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy the local prediction log to S3: new Parquet segments, grown journals; never .tmp files; deletes nothing.
    Endpoint and credentials: AWS_ENDPOINT_URL (S3-compatible servers), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY."""
    import threading

    from monitoring.log_shipper import ship_once, ship_until
    from monitoring.log_store import S3_SCHEME

    if not to.startswith(S3_SCHEME):
        raise InvalidSettingsError(f"--to {to!r}: give an s3://bucket/prefix URI")
    source = log_root or Workspace.resolve(workspace).root / "prediction_log"
    if once:
        result = ship_once(source, to)
        _emit(as_json, result.to_dict(), [result.line()])
        return
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    ship_until(source, to, interval_s, stop, lambda r: _emit(as_json, r.to_dict(), [r.line()]))


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run(argv: list[str] | None = None) -> None:
    """Console entry point, and the one place errors become exit codes (`treeops.errors`).

    Expected errors (`TreeopsError`, invalid settings, bad arguments) print one line `error: ...` on stderr, without
    a traceback, and exit with their code; with `--json` a JSON object {error, kind, exit_code, ...} goes to stdout.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        code = app(args=args, prog_name="treeops", standalone_mode=False)
    except TreeopsError as exc:
        _fail(exc, "--json" in args)
    except pydantic.ValidationError as exc:
        problems = "; ".join(": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, "))))
                             for e in exc.errors())
        _fail(InvalidSettingsError(f"invalid setting ({exc.title}): {problems}"), "--json" in args)
    except NoArgsIsHelpError as exc:  # `treeops` or `treeops bench` alone: the help is the message
        typer.echo(exc.format_message())
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # unknown option, bad or missing value: invalid arguments, exit 2
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(InvalidSettingsError(exc.format_message() + hint), "--json" in args)
    except typer.Abort:
        typer.echo("error: interrupted", err=True)
        sys.exit(EXIT_ERROR)
    if isinstance(code, int) and code:  # typer.Exit(N) and Ctrl-C (130) come back as the exit code
        sys.exit(code)


def _fail(exc: TreeopsError, as_json: bool) -> None:
    typer.echo(f"error: {exc}", err=True)
    if as_json:
        typer.echo(json.dumps(exc.to_dict(), indent=2, default=str))
    sys.exit(exc.exit_code)
