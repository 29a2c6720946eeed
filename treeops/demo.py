"""`treeops demo`: every stage end to end on the workspace's embedded defaults."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
import polars as pl

from backends.online_history import redacted
from export.pipeline import ExportSettings, export_model, export_version
from export.repository import PARITY_FILE, ModelRepository
from loadtest.latency import health_latency
from loadtest.pipeline import loadtest_served_model
from monitoring.alert_rules import RULES_FILE
from monitoring.drift import run_drift_report
from monitoring.labels import ingest_labels
from monitoring.monitor import MonitorPaths, run_monitor
from monitoring.prediction_log import read_window
from online_store.backfill import backfill
from retraining.gate import GateSettings
from retraining.loop import LoopSettings, run_loop_once
from server.admin import AdminClient
from server.client import ScoringClient, load_features, transaction_feeds
from server.errors import ServerError
from server.launcher import TritonServer
from server.replay import replay, replay_parity
from training.features import FRAUD_FEATURES, FittedFeatures
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.ingest import load_raw
from training.pipeline import train_and_register
from treeops.errors import EXIT_DRIFT, EXIT_QUALITY
from treeops.workspace import Workspace

log = logging.getLogger(__name__)

MODEL = "fraud"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and ports of the demo run."""

    rows: int = 200_000
    batch_rows: int = 20_000
    seed: int = 7
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    loadtest_s: int = 10
    loadtest_users: int = 8
    loadtest_p99_ms: float = 250.0  # generous: the demo runs on whatever machine it is given
    latency_requests: int = 1000
    replay_clients: int = 8
    drift_rows: int = 6_000  # drifted transactions served after the load test, labelled, then the loop runs
    drift_gate_rows: int = 1_500  # its newest part: the loop's gate window (the older part trains the challenger)
    drift_fraud_rate: float = 0.06  # enough positives in each part for a retrain and a gate verdict
    # a new fraud pattern in the drifted batch (the generator's drift moves the inputs only, so a champion trained on
    # far more data would stay ahead): this share of point-of-sale grocery and fuel payments, which it scores as safe
    new_pattern_fraud: float = 0.5
    gate_slo_s: int = 3  # seconds of the gate's SLO run against the loaded challenger
    keep_serving: bool = False


@dataclass
class DemoSummary:
    """Figures the demo prints at the end."""

    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.values

    def lines(self) -> list[str]:
        v = self.values
        lines = [
            "",
            "treeops demo summary",
            f"  served model         {MODEL} version {v['served_version']} (@champion) from {v['model_repository']}",
            f"  trained this run     version {v['registered_version']} (@{v['registered_alias']})",
            f"  test metrics         ROC AUC {v['roc_auc']:.4f} (without the history features "
            f"{_auc(v['roc_auc_without_history'])}), PR AUC {v['pr_auc']:.4f}, log loss {v['log_loss']:.4f}",
            f"  parity (file vs xgb) max |diff| {v['parity_max_abs_diff']:.2e} on {v['parity_rows']} rows, "
            f"{v['parity_flipped']} flipped",
            f"  online store         {v['store_url']}: backfilled {v['backfill_rows']} transactions "
            f"({v['backfill_rows_per_s']:,.0f}/s)",
            f"  served vs offline    max |diff| {v['served_max_abs_diff']:.2e}, {v['served_flipped']} flipped, on "
            f"{v['scored_rows']} raw transactions, one per gRPC call in time order "
            f"({'PASS' if v['served_parity_passed'] else 'FAIL'})",
            f"  raw transaction      p50 {v['score_p50_us']:.0f} us, p99 {v['score_p99_us']:.0f} us sequential "
            f"(health round trip p50 {v['health_p50_us']:.0f} us); {v['replay_rate']:,.0f} txn/s from "
            f"{v['replay_clients']} clients (server-side figures: treeops bench serving)",
        ]
        if "loadtest" in v:
            lt = v["loadtest"]
            lines.append(f"  {'locust (' + str(lt['duration_s']) + ' s)':<21}{lt['rps']:.0f} req/s, p50 {lt['p50_ms']:.1f} ms, "
                         f"p99 {lt['p99_ms']:.1f} ms, {lt['failures']} failures -> {'PASS' if lt['passed'] else 'FAIL'}")
        lines += [
            f"  load test report     {v['loadtest']['report'] if 'loadtest' in v else '-'}",
            f"  drift, current batch {'DRIFT' if v['drift_current'] else 'no drift'} ({v['drift_current_report']})",
            f"  drift, shifted batch {'DRIFT' if v['drift_shifted'] else 'no drift'} ({v['drift_shifted_report']})",
        ]
        if "loop" in v:
            lp = v["loop"]
            lines.append(f"  drifted traffic      {v['drift_rows']:,} raw transactions served and labelled: the older "
                         f"{v['drift_rows'] - v['drift_gate_rows']:,} to retrain on, the newest "
                         f"{v['drift_gate_rows']:,} to judge on")
            lines.append(f"  loop --once          {lp['decision'].replace('_', ' ')} (exit {lp['exit_code']}): "
                         f"{lp['reason']}")
            lines += [f"    {s['step']:<9}{s['summary']}" for s in lp["steps"] if s["step"] != "decision"]
            if lp["steps"] and lp["steps"][0]["step"] == "monitor":
                lines.append(f"    {'':<9}(monitor exits: {EXIT_DRIFT} drift, {EXIT_QUALITY} quality drop)")
            lines.append(f"  served at the end    {MODEL} answers with version {v['served_version_end']} "
                         "(one raw transaction over gRPC)")
        if "monitor" in v:
            lines.append(f"  prediction log       {v['logged_rows']:,} rows logged by Triton; monitor window "
                         f"(exit {v['monitor']['exit_code']}):")
            lines += ["  " + line for line in v["monitor_lines"]]
            lines.append(f"  alert rules          {v['alert_rules']} (promtool test rules monitoring/alerts/tests/*.yml)")
        lines.append(f"  wall time            {v['wall_s']:.1f} s")
        return lines


def _auc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_demo(ws: Workspace, settings: DemoSettings, server: TritonServer, store_url: str) -> DemoSummary:
    """Generate -> train -> register -> export -> backfill -> serve -> replay -> load test -> drifted traffic ->
    loop once (monitor -> retrain -> shadow -> gate -> promote) -> drift reports -> monitor the demo's own traffic.

    The current batch is the period after the training data (same cards); the served `fraud` takes raw
    transactions and reads each card's history from the online store at `store_url`, which is backfilled
    with the training period first. Triton stops at the end unless `settings.keep_serving` (then the caller
    prints the summary and calls `serve_until_stopped`; it serves the version the loop left as champion).
    """
    start = time.perf_counter()
    v: dict[str, Any] = {"workspace": str(ws.root), "model_repository": str(ws.model_repository), "store_url": redacted(store_url)}
    train_path, current_path, shifted_path = (ws.data_dir / f"{n}.parquet" for n in ("train", "current", "shifted"))
    history = generate_transactions(GenerateSpec(rows=settings.rows + settings.batch_rows, seed=settings.seed))
    history = history.sort("timestamp", "transaction_id")
    cut = history["timestamp"][settings.rows]
    train, current = history.filter(pl.col("timestamp") < cut), history.filter(pl.col("timestamp") >= cut)
    write_transactions(train, train_path)
    write_transactions(current, current_path)
    write_transactions(generate_transactions(GenerateSpec(rows=settings.batch_rows, seed=settings.seed + 2, drift=1.0)),
                       shifted_path)

    outcome = train_and_register(train_path, "is_fraud", MODEL, tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
    v.update({k: outcome.metrics[k] for k in ("roc_auc", "pr_auc", "log_loss")})
    v["roc_auc_without_history"] = outcome.metrics.get("roc_auc_without_history")
    v.update(registered_version=outcome.registered.version, registered_alias=outcome.registered.alias)

    mlflow.set_tracking_uri(ws.tracking_uri)
    repo = ModelRepository(ws.model_repository)
    raw_inputs = ExportSettings(raw_inputs=True)
    trained = export_version(MODEL, repo, version=outcome.registered.version, settings=raw_inputs)  # this run's gate
    exported = export_model(MODEL, repo, alias="champion", settings=raw_inputs)  # serves the champion
    v["served_version"] = exported.version
    parity = json.loads((trained.version_dir / PARITY_FILE).read_text())
    v.update(parity_max_abs_diff=parity["max_abs_diff"], parity_rows=parity["rows"],
             parity_flipped=parity["flipped_decisions"])
    features = load_features(exported.version_dir)
    loaded = backfill(store_url, features, train_path)
    v.update(backfill_rows=loaded.rows, backfill_rows_per_s=loaded.rows_per_s)

    served_from = dt.datetime.now(dt.UTC)
    drifted = _drifted_batch(history, settings)
    try:
        server.start(timeout_s=120, models=[MODEL])
        v.update(_replay_current(server, exported.version, features, train, current, settings))
        lt = loadtest_served_model(
            ws.model_repository, MODEL, current_path, ws.reports_dir / "loadtest",
            grpc_url=server.settings.grpc_url, http_url=server.settings.http_url, protocols=("grpc",),
            users=settings.loadtest_users, duration_s=settings.loadtest_s,
            overrides={"p99_ms": settings.loadtest_p99_ms, "max_error_rate": 0.0},
        )
        a = lt.aggregate
        v["loadtest"] = {"duration_s": settings.loadtest_s, "rps": a.rps, "p50_ms": a.p50_ms, "p99_ms": a.p99_ms,
                         "failures": a.failures, "passed": lt.passed, "report": str(lt.html_report)}
        drifted_from = dt.datetime.now(dt.UTC)  # the demo's own traffic ends here, the drifted traffic starts
        v.update(_serve_drift_and_loop(ws, server, drifted, settings))
    finally:
        if not settings.keep_serving:
            server.stop()

    reference = FRAUD_FEATURES.compute(load_raw(train_path, FRAUD_FEATURES.raw_schema)).collect()
    for key, path in (("current", current_path), ("shifted", shifted_path)):
        batch = FRAUD_FEATURES.compute(load_raw(path, FRAUD_FEATURES.raw_schema)).collect()
        report = run_drift_report(reference, batch, FRAUD_FEATURES.names, ws.reports_dir, name=f"drift_{key}",
                                  categorical=FRAUD_FEATURES.categorical)
        v[f"drift_{key}"] = report.drift_detected
        v[f"drift_{key}_report"] = str(report.html_path)
    if not settings.keep_serving:  # the log is complete once Triton has stopped
        v.update(_monitor_served_traffic(ws, current, served_from, drifted_from))
    v["wall_s"] = time.perf_counter() - start
    return DemoSummary(v)


def _replay_current(server: TritonServer, version: int, features: FittedFeatures, train: pl.DataFrame,
                    current: pl.DataFrame, settings: DemoSettings) -> dict[str, Any]:
    """Score the current batch one transaction per call in time order: the first `latency_requests` from one
    client (sequential latency), the rest from `replay_clients` clients (cards interleaved); every score is
    compared with offline features + xgboost on the card's history."""
    booster = mlflow.xgboost.load_model(f"models:/{MODEL}/{version}")
    url, n = server.settings.grpc_url, min(settings.latency_requests, current.height)
    stream = current.drop("is_fraud")
    health = health_latency(url, requests=settings.latency_requests)
    sequential = replay(url, MODEL, stream.head(n), "card_id", clients=1)
    concurrent = replay(url, MODEL, stream.slice(n), "card_id", clients=settings.replay_clients)
    served = np.concatenate([sequential.probabilities, concurrent.probabilities])
    parity = replay_parity(booster, features, train, current, served)
    log.info("replayed %d transactions through Triton version %s", current.height, version)
    return {
        "scored_rows": current.height,
        "served_max_abs_diff": parity.max_abs_diff,
        "served_flipped": parity.flipped_decisions,
        "served_parity_passed": parity.passed,
        "score_p50_us": float(np.percentile(sequential.latency_us, 50)),
        "score_p99_us": float(np.percentile(sequential.latency_us, 99)),
        "replay_clients": concurrent.clients,
        "replay_rate": concurrent.rate,
        "health_p50_us": health.p50_us,
    }


def _drifted_batch(history: pl.DataFrame, settings: DemoSettings) -> pl.DataFrame:
    """`drift_rows` strongly drifted transactions of new cards and ids, in the days after `history`, with a new fraud
    pattern: `new_pattern_fraud` of the point-of-sale grocery and fuel payments are fraud."""
    spec = GenerateSpec(rows=settings.drift_rows, seed=settings.seed + 3, drift=1.0, fraud_rate=settings.drift_fraud_rate,
                        start=history["timestamp"].max() + dt.timedelta(days=1))
    batch = generate_transactions(spec, first_id=int(history["transaction_id"].max()) + 1,
                                  first_card=int(history["card_id"].max()) + 1)
    pattern = (pl.col("channel") == "pos") & pl.col("merchant_category").is_in(["grocery", "fuel"])
    drawn = np.random.default_rng(settings.seed + 4).random(batch.height) < settings.new_pattern_fraud
    batch = batch.with_columns(is_fraud=pl.when(pattern & pl.Series(drawn)).then(True).otherwise(pl.col("is_fraud"))
                               .cast(batch.schema["is_fraud"]))
    return batch.sort("timestamp", "transaction_id")


def _serve_drift_and_loop(ws: Workspace, server: TritonServer, batch: pl.DataFrame,
                          settings: DemoSettings) -> dict[str, Any]:
    """Serve `batch` through Triton in two slices, label it, then `treeops loop --once` with the running Triton.

    The log's arrival times are wall clock, so the loop's windows come from the measured slice times: the older
    slice is what the challenger trains on, the newest (`drift_gate_rows`) what it is shadowed and judged on.
    """
    url, paths = server.settings.grpc_url, MonitorPaths.in_workspace(ws.root, MODEL)
    older, newest = batch.head(batch.height - settings.drift_gate_rows), batch.tail(settings.drift_gate_rows)
    started = dt.datetime.now(dt.UTC)
    replay(url, MODEL, older.drop("is_fraud"), "card_id", clients=settings.replay_clients)
    gate_from = dt.datetime.now(dt.UTC)
    replay(url, MODEL, newest.drop("is_fraud"), "card_id", clients=settings.replay_clients)
    end = dt.datetime.now(dt.UTC)
    logged = _wait_for_log(paths, started, end, batch.height)
    _ingest_labels(ws, paths, batch, end, logged)
    loop_settings = LoopSettings(window=end - started, gate_window=end - gate_from,
                                 gate=GateSettings(slo_duration_s=settings.gate_slo_s, slo_users=2,
                                                   p99_ms=settings.loadtest_p99_ms))
    with AdminClient.from_settings(server.settings) as admin:
        outcome = run_loop_once(MODEL, end, ws, loop_settings, triton=admin, grpc_url=url)
    with ScoringClient(url, MODEL) as client:
        answered = client.score_inputs(transaction_feeds(client.served_signature(), newest.drop("is_fraud").tail(1)))
    log.info("loop %s; %s answers with version %s", outcome.decision, MODEL, answered.model_version)
    return {"drift_rows": batch.height, "drift_gate_rows": newest.height, "loop": outcome.to_dict(),
            "drift_window": {"start": started.isoformat(), "gate_from": gate_from.isoformat(), "end": end.isoformat()},
            "served_version_end": int(answered.model_version)}


def _wait_for_log(paths: MonitorPaths, start: dt.datetime, end: dt.datetime, rows: int,
                  timeout_s: float = 30.0) -> pl.DataFrame:
    """The rows logged in [start, end) once there are `rows` of them (Triton's log flushes about every second)."""
    deadline = time.monotonic() + timeout_s
    while (logged := read_window(paths.log_root, MODEL, start, end)).height < rows:
        if time.monotonic() > deadline:
            raise ServerError(f"Triton logged {logged.height} of the {rows} transactions served between "
                              f"{start.isoformat()} and {end.isoformat()} in {paths.log_root} within {timeout_s:.0f} s; "
                              "its log (the workspace's reports/triton.log) says why")
        time.sleep(0.5)
    return logged


def _ingest_labels(ws: Workspace, paths: MonitorPaths, batch: pl.DataFrame, labelled_at: dt.datetime,
                   logged: pl.DataFrame) -> None:
    """`batch`'s labels arrive at `labelled_at` (`treeops labels`), checked against the `logged` predictions."""
    labels_path = ws.data_dir / "labels.parquet"
    batch.select(transaction_id=pl.col("transaction_id"), label=pl.col("is_fraud").cast(pl.Int8),
                 labelled_at=pl.lit(labelled_at)).write_parquet(labels_path)
    ingest_labels(labels_path, paths.labels_dir, logged["transaction_id"].drop_nulls())


def _monitor_served_traffic(ws: Workspace, current: pl.DataFrame, served_from: dt.datetime,
                            end: dt.datetime) -> dict[str, Any]:
    """The labels of the current period arrive (`treeops labels`), then one monitor window (`treeops monitor`) over
    what the demo's Triton logged in [served_from, end) (the replay and the load test; the drifted traffic the loop
    acted on comes after): drift against the version's training reference and quality on the labels."""
    paths = MonitorPaths.in_workspace(ws.root, MODEL)
    logged = read_window(paths.log_root, MODEL, served_from, end)
    _ingest_labels(ws, paths, current, dt.datetime.now(dt.UTC), logged)
    result = run_monitor(MODEL, served_from, end, paths)
    return {"logged_rows": logged.height, "monitor": result.to_dict(), "monitor_lines": result.lines(),
            "alert_rules": str(RULES_FILE)}


def serve_until_stopped(server: TritonServer) -> None:
    """After the summary of a `keep_serving` demo: Triton serves in the foreground until Ctrl-C or SIGTERM."""
    log.info("keeping Triton serving on gRPC %s (Ctrl-C to stop)", server.settings.grpc_url)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
