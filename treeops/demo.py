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
from server.client import load_features
from server.launcher import TritonServer
from server.replay import replay, replay_parity
from training.features import FRAUD_FEATURES, FittedFeatures
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.ingest import load_raw
from training.pipeline import train_and_register
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
    """Generate -> train -> register -> export -> backfill -> serve -> replay -> load test -> drift.

    The current batch is the period after the training data (same cards); the served `fraud` takes raw
    transactions and reads each card's history from the online store at `store_url`, which is backfilled
    with the training period first. Triton stops at the end unless `settings.keep_serving` (then the caller
    prints the summary and calls `serve_until_stopped`).
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
        v.update(_monitor_served_traffic(ws, current, served_from))
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


def _monitor_served_traffic(ws: Workspace, current: pl.DataFrame, served_from: dt.datetime) -> dict[str, Any]:
    """The labels of the current period arrive (`treeops labels`), then one monitor window (`treeops monitor`) over
    everything the demo's Triton logged: drift against the version's training reference and quality on the labels."""
    end = dt.datetime.now(dt.UTC)
    paths = MonitorPaths.in_workspace(ws.root, MODEL)
    labels_path = ws.data_dir / "labels.parquet"
    current.select(transaction_id=pl.col("transaction_id"), label=pl.col("is_fraud").cast(pl.Int8),
                   labelled_at=pl.lit(end)).write_parquet(labels_path)
    logged = read_window(paths.log_root, MODEL, served_from, end)
    ingest_labels(labels_path, paths.labels_dir, logged["transaction_id"].drop_nulls())
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
