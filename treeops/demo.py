"""`treeops demo`: every stage end to end on the workspace's embedded defaults."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from export.pipeline import ExportSettings, export_model, export_version
from export.repository import PARITY_FILE, ModelRepository
from loadtest.latency import health_latency, scoring_latency
from loadtest.pipeline import loadtest_served_model
from monitoring.drift import run_drift_report
from server.client import ScoringClient, load_features, request_feeds
from server.launcher import TritonServer
from training.features import FRAUD_FEATURES
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
            f"  test metrics         ROC AUC {v['roc_auc']:.4f}, PR AUC {v['pr_auc']:.4f}, log loss {v['log_loss']:.4f}",
            f"  parity (file vs xgb) max |diff| {v['parity_max_abs_diff']:.2e} on {v['parity_rows']} rows, "
            f"{v['parity_flipped']} flipped",
            f"  served vs xgboost    max |diff| {v['served_max_abs_diff']:.2e} on {v['scored_rows']} rows over gRPC",
            f"  ScoringClient 1 row  p50 {v['score_p50_us']:.0f} us, p99 {v['score_p99_us']:.0f} us "
            f"(health round trip p50 {v['health_p50_us']:.0f} us; server-side figures: treeops bench serving)",
        ]
        if "loadtest" in v:
            lt = v["loadtest"]
            lines.append(f"  {'locust (' + str(lt['duration_s']) + ' s)':<21}{lt['rps']:.0f} req/s, p50 {lt['p50_ms']:.1f} ms, "
                         f"p99 {lt['p99_ms']:.1f} ms, {lt['failures']} failures -> {'PASS' if lt['passed'] else 'FAIL'}")
        lines += [
            f"  load test report     {v['loadtest']['report'] if 'loadtest' in v else '-'}",
            f"  drift, current batch {'DRIFT' if v['drift_current'] else 'no drift'} ({v['drift_current_report']})",
            f"  drift, shifted batch {'DRIFT' if v['drift_shifted'] else 'no drift'} ({v['drift_shifted_report']})",
            f"  wall time            {v['wall_s']:.1f} s",
        ]
        return lines


def run_demo(ws: Workspace, settings: DemoSettings, server: TritonServer) -> DemoSummary:
    """Generate -> train -> register -> export -> serve -> score -> load test -> drift; Triton stops at the end."""
    start = time.perf_counter()
    v: dict[str, Any] = {"workspace": str(ws.root), "model_repository": str(ws.model_repository)}
    train_path, current_path, shifted_path = (ws.data_dir / f"{n}.parquet" for n in ("train", "current", "shifted"))
    write_transactions(generate_transactions(GenerateSpec(rows=settings.rows, seed=settings.seed)), train_path)
    write_transactions(generate_transactions(GenerateSpec(rows=settings.batch_rows, seed=settings.seed + 1)), current_path)
    write_transactions(generate_transactions(GenerateSpec(rows=settings.batch_rows, seed=settings.seed + 2, drift=1.0)),
                       shifted_path)

    outcome = train_and_register(train_path, "is_fraud", MODEL, tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
    v.update({k: outcome.metrics[k] for k in ("roc_auc", "pr_auc", "log_loss")})
    v.update(registered_version=outcome.registered.version, registered_alias=outcome.registered.alias)

    mlflow.set_tracking_uri(ws.tracking_uri)
    repo = ModelRepository(ws.model_repository)
    trained = export_version(MODEL, repo, version=outcome.registered.version)  # the parity gate of this run's model
    exported = export_model(MODEL, repo, alias="champion", settings=ExportSettings())  # serves the champion
    v["served_version"] = exported.version
    parity = json.loads((trained.version_dir / PARITY_FILE).read_text())
    v.update(parity_max_abs_diff=parity["max_abs_diff"], parity_rows=parity["rows"],
             parity_flipped=parity["flipped_decisions"])

    try:
        server.start(timeout_s=120, models=[MODEL])
        v.update(_score_and_measure(server, repo, exported.version, current_path, settings))
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
    v["wall_s"] = time.perf_counter() - start
    if settings.keep_serving:
        _serve_until_stopped(server)
    return DemoSummary(v)


def _score_and_measure(server: TritonServer, repo: ModelRepository, version: int, batch: Path,
                       settings: DemoSettings) -> dict[str, Any]:
    import numpy as np

    features = load_features(repo.version_dir(MODEL, version))
    raw = load_raw(batch, features.spec.raw_schema).collect()
    booster = mlflow.xgboost.load_model(f"models:/{MODEL}/{version}")
    x = features.matrix_raw(raw)
    with ScoringClient(server.settings.grpc_url, MODEL) as client:
        feeds = request_feeds(client.served_signature(), features, raw)  # what the served model takes
        scores = client.score_inputs(feeds)
        served_diff = float(np.max(np.abs(scores.positive - booster.inplace_predict(x))))
        latency = scoring_latency(client, {k: v[:256] for k, v in feeds.items()}, requests=settings.latency_requests)
    health = health_latency(server.settings.grpc_url, requests=settings.latency_requests)
    log.info("scored %d rows through Triton version %s", len(raw), scores.model_version)
    return {
        "scored_rows": len(raw),
        "served_max_abs_diff": served_diff,
        "score_p50_us": latency.p50_us,
        "score_p99_us": latency.p99_us,
        "health_p50_us": health.p50_us,
        "answered_version": scores.model_version,
    }


def _serve_until_stopped(server: TritonServer) -> None:
    log.info("keeping Triton serving on gRPC %s (Ctrl-C to stop)", server.settings.grpc_url)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
