"""treeops loop --once: monitor -> retrain -> export -> shadow -> gate -> promote, with the lock and the audit log.

A champion (version 1) trained on a small clean batch; drifted traffic it served logged over the two hours before
END, every row labelled. The loop trains the challenger on the older 90 minutes and shadows and judges it on the
newest 30.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest

from bench.monitor import log_predictions
from export.parity import reference_scores
from export.pipeline import export_model
from export.repository import ModelRepository
from monitoring.labels import LABELLED_AT, ingest_labels
from monitoring.monitor import MonitorPaths
from registry import versions as registry
from registry.consistency import check, warn_on_drift
from registry.promotion import AuditLog
from retraining.gate import GATE_SUFFIX, GateCheck, GateSettings, GateVerdict, record_verdict, slo_budgets
from retraining.loop import LoopSettings, loop_lock, promote_step, retrain_step, run_loop_once
from retraining.shadow import InBandShadowNeeded, read_shadow, require_same_spec
from server.admin import AdminClient
from server.client import ScoringClient
from steady_load import SteadyLoad
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.errors import EXIT_DRIFT, EXIT_NO_DATA, EXIT_QUALITY
from treeops.workspace import Workspace
from triton_fixtures import serving

MODEL = "fraud"
END = dt.datetime(2026, 3, 1, 13, tzinfo=dt.UTC)
SETTINGS = LoopSettings(window=dt.timedelta(hours=2), gate_window=dt.timedelta(minutes=30),
                        gate=GateSettings(min_labels=50, slo_duration_s=3, slo_users=2, p99_ms=500.0))
PARAMS = TrainParams(num_boost_round=30, max_depth=4, learning_rate=0.2, subsample=0.9, seed=5)
TREEOPS = str(Path(sys.executable).parent / "treeops")
ADMIN_KEY = "test-admin-key-0123456789"

pytestmark = pytest.mark.slow


def _workspace(root: Path) -> tuple[Workspace, np.ndarray]:
    """Champion v1 exported; 4,000 drifted, labelled predictions it served logged in the 2 h before END. Returns the
    workspace and some logged feature rows for a client."""
    ws = Workspace(root)
    data = write_transactions(generate_transactions(GenerateSpec(rows=3_000, seed=3)), ws.data_dir / "train.parquet")
    train_and_register(data, "is_fraud", MODEL, params=PARAMS, tracking_uri=ws.tracking_uri,
                       artifact_root=ws.artifact_root)
    export_model(MODEL, ModelRepository(ws.model_repository))
    bundle = registry.load_bundle(registry.resolve(MODEL, alias="champion"), root / "bundle")
    paths = MonitorPaths.in_workspace(ws.root, MODEL)
    raw = generate_transactions(GenerateSpec(rows=6_000, seed=11, fraud_rate=0.06, drift=1.0), first_id=1_000_000)
    x = bundle.fitted.matrix_raw(raw)
    ids = raw["transaction_id"].cast(pl.String).to_list()
    log_predictions(paths.log_root, bundle.fitted.spec.names, x, reference_scores(bundle.booster, x)[:, -1], ids,
                    end=END, window=dt.timedelta(hours=2))
    labels = pl.DataFrame({"transaction_id": ids, "label": raw["is_fraud"].cast(pl.Int8),
                           LABELLED_AT: [END.isoformat()] * len(ids)})
    labels.write_csv(ws.root / "labels.csv")
    ingest_labels(ws.root / "labels.csv", paths.labels_dir, pl.Series(ids))
    return ws, x[:300]


@pytest.fixture
def tracking():
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def _events(ws: Workspace) -> list[dict]:
    return AuditLog(ws.audit_log).read()


def test_the_gate_refuses_a_challenger_short_of_the_margin_and_promotes_nothing(tmp_path, tracking):
    ws, _ = _workspace(tmp_path / "ws")
    settings = SETTINGS.model_copy(update={"gate": GateSettings(margin=0.5, min_labels=50)})
    outcome = run_loop_once(MODEL, END, ws, settings)

    assert outcome.decision == "refused" and outcome.exit_code == 1, outcome.lines()
    assert registry.aliases(MODEL) == {"champion": 1, "challenger": 2}  # nothing promoted
    assert [s["step"] for s in outcome.steps] == ["monitor", "retrain", "export", "shadow", "decision"]
    refused = [e for e in _events(ws) if e["event"] == "gate_refused"]
    assert len(refused) == 1 and refused[0]["to_version"] == 2 and refused[0]["from_version"] == 1
    quality = refused[0]["metrics"]["quality"]
    assert quality["margin"] == 0.5 and quality["labelled"] >= 50
    assert f"{quality['challenger_roc_auc']:.5f}" in refused[0]["reason"]
    assert "minimum absolute change check failed" in refused[0]["reason"]  # mlflow.validate_evaluation_results
    assert [c.name for c in outcome.verdict.checks] == ["parity", "quality"]  # no SLO run after a refusal
    monitored = outcome.to_dict()["monitor_exit_code"]
    assert monitored in (EXIT_DRIFT, EXIT_QUALITY) and f": exit {monitored} " in outcome.steps[0]["summary"]
    assert not any(e["event"] == "promote" for e in _events(ws))
    assert {e["event"] for e in _events(ws)} >= {"loop_monitor", "loop_retrain", "loop_export", "loop_shadow",
                                                 "loop_decision"}

    # the shadow stored both scores beside each other; the champion's are the logged ones
    shadow = read_shadow(outcome_shadow(ws))
    assert shadow.columns == ["request_id", "transaction_id", "arrival", "champion_version", "champion_score",
                              "challenger_score"]
    assert shadow.height == 1_500 and shadow["champion_version"].unique().to_list() == [1]
    assert not np.allclose(shadow["champion_score"].to_numpy(), shadow["challenger_score"].to_numpy())


def outcome_shadow(ws: Workspace):
    from retraining.shadow import ShadowResult, shadow_path

    start = END - SETTINGS.gate_window
    return ShadowResult(MODEL, 1, 2, start, END, 0, shadow_path(ws.root / "shadow", MODEL, 2, start, END))


def test_versions_of_another_feature_spec_need_in_band_shadowing(tmp_path, tracking):
    ws = Workspace(tmp_path / "ws")
    data = write_transactions(generate_transactions(GenerateSpec(rows=2_000, seed=3)), ws.data_dir / "t.parquet")
    for features in ("card_transactions_v2", "columns"):  # the fraud spec, then one fitted on the columns
        train_and_register(data, "is_fraud", MODEL, params=PARAMS, features=features, tracking_uri=ws.tracking_uri,
                           artifact_root=ws.artifact_root)
    with pytest.raises(InBandShadowNeeded, match="in-band shadowing .* does not build yet"):
        require_same_spec(MODEL, 1, 2)


def test_the_slo_run_takes_the_files_budgets_and_overrides_only_what_is_set():
    assert slo_budgets(GateSettings()).model_dump(exclude_none=True) == {"p99_ms": 120.0, "max_error_rate": 0.0}
    ci = slo_budgets(GateSettings(slo_file=Path("loadtest/slo-ci.toml")))
    assert (ci.p99_ms, ci.min_rps, ci.max_error_rate) == (120, 300, 0.0)
    assert slo_budgets(GateSettings(slo_file=Path("loadtest/slo-ci.toml"), p99_ms=40.0)).p99_ms == 40.0


def test_a_second_loop_is_refused_while_one_holds_the_lock(tmp_path):
    ws = Workspace(tmp_path / "ws")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "TREEOPS_WORKSPACE")}
    with loop_lock(ws.root) as lock:
        proc = subprocess.run([TREEOPS, "loop", "--once", "--workspace", str(ws.root), "--json"],
                              capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    error = json.loads(proc.stdout)
    assert error["kind"] == "LoopBusyError" and str(lock) in error["error"] and str(os.getpid()) in error["error"]
    assert "another `treeops loop` is running" in proc.stderr
    assert not ws.audit_log.exists()  # it did nothing


@pytest.mark.triton
def test_loop_once_promotes_a_better_challenger_live_with_zero_failed_requests(tmp_path, tracking):
    ws, rows = _workspace(tmp_path / "ws")
    with (serving(ws, models=[MODEL], exit_timeout_s=5, admin_key=ADMIN_KEY) as server,
          AdminClient(server.settings.grpc_url, ADMIN_KEY) as admin):
        with SteadyLoad(server.settings.grpc_url, rows, threads=2, model=MODEL) as load:
            time.sleep(0.5)
            outcome = run_loop_once(MODEL, END, ws, SETTINGS, triton=admin, grpc_url=server.settings.grpc_url)
            deadline = time.monotonic() + 30
            while load.latest_version() != "2":
                assert time.monotonic() < deadline, "answers never came from version 2"
                time.sleep(0.05)
            time.sleep(0.3)
        assert outcome.decision == "promoted", outcome.lines()
        assert load.failures == [], load.failures[:5]
        seen = [v for _, v in load.versions]
        assert seen[0] == "1" and seen[-1] == "2" and len(seen) > 100
        assert not admin.model_ready(MODEL + GATE_SUFFIX, 2)  # the gate's copy is gone
        with ScoringClient(server.settings.grpc_url, MODEL) as client:
            assert client.score(rows[:3]).model_version == "2"

    assert registry.aliases(MODEL) == {"champion": 2}
    assert [c.name for c in outcome.verdict.checks] == ["parity", "quality", "slo"]
    assert all(c.passed for c in outcome.verdict.checks)
    assert outcome.verdict.checks[2].figures["failures"] == 0 and outcome.verdict.checks[2].figures["requests"] > 0
    events = [e["event"] for e in _events(ws)]
    assert events == ["loop_monitor", "loop_retrain", "loop_export", "loop_shadow", "gate_passed", "promote",
                      "loop_decision"]
    assert not (ws.model_repository / (MODEL + GATE_SUFFIX)).exists()


def _promoted_by_the_loop(root: Path) -> tuple[Workspace, dt.datetime]:
    """The workspace of `_workspace` after a loop promotion: version 2 retrained from the log, a passed gate and
    `promote_step` recorded as the loop records them (no Triton). Returns it and the end of the window after the
    promotion (promotions are stamped with the wall clock)."""
    ws, _ = _workspace(root)
    paths = MonitorPaths.in_workspace(ws.root, MODEL)
    audit = AuditLog(ws.audit_log)
    assert retrain_step(MODEL, END - SETTINGS.window, END, ws, paths, "test").registered.version == 2
    verdict = GateVerdict(MODEL, 1, 2, (GateCheck("quality", True, "passed in this test"),))
    record_verdict(audit, verdict)
    promote_step(MODEL, ModelRepository(ws.model_repository), audit, verdict, None, 2)
    assert registry.aliases(MODEL) == {"champion": 2}
    return ws, dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(hours=1)


def _serve_next_window(ws: Workspace, end: dt.datetime, ranked_by: int, labelled: int = 1_000) -> None:
    """Version 2 logs 1,000 predictions in the 30 minutes before `end`; the first `labelled` of them get labels
    that version `ranked_by`'s scores order perfectly (its top 8 % are the frauds)."""
    paths = MonitorPaths.in_workspace(ws.root, MODEL)
    boosters = {v: registry.load_bundle(registry.resolve(MODEL, version=v), ws.root / f"bundle-{v}") for v in (1, 2)}
    raw = generate_transactions(GenerateSpec(rows=1_000, seed=21, drift=1.0), first_id=5_000_000)
    x = boosters[2].fitted.matrix_raw(raw)
    scores = {v: reference_scores(b.booster, x)[:, -1] for v, b in boosters.items()}
    ids = raw["transaction_id"].cast(pl.String).to_list()
    log_predictions(paths.log_root, boosters[2].fitted.spec.names, x, scores[2], ids, version=2, end=end,
                    window=dt.timedelta(minutes=30))
    fraud = scores[ranked_by] >= np.quantile(scores[ranked_by], 0.92)
    pl.DataFrame({"transaction_id": ids[:labelled], "label": fraud[:labelled].astype(np.int8),
                  LABELLED_AT: [end.isoformat()] * labelled}).write_csv(ws.root / "labels-next.csv")
    ingest_labels(ws.root / "labels-next.csv", paths.labels_dir, pl.Series(ids))


def test_a_promoted_champion_worse_on_its_next_window_is_rolled_back_and_nothing_retrained(tmp_path, tracking):
    ws, end = _promoted_by_the_loop(tmp_path / "ws")
    _serve_next_window(ws, end, ranked_by=1)  # labels only the previous champion ranks right
    before = len(_events(ws))
    outcome = run_loop_once(MODEL, end, ws, SETTINGS)

    assert outcome.decision == "rolled_back" and outcome.exit_code == 0 and outcome.champion == 1, outcome.lines()
    assert registry.aliases(MODEL) == {"champion": 1}
    assert [s["step"] for s in outcome.steps] == ["rollback", "decision"]  # no monitor, no retrain
    assert outcome.to_dict()["monitor_exit_code"] is None
    events = _events(ws)[before:]
    assert [e["event"] for e in events] == ["loop_rollback", "rollback", "loop_decision"]
    figures = events[0]["metrics"]["rollback"]
    assert figures["labelled"] == 1_000 and figures["previous_roc_auc"] == 1.0
    assert figures["champion_roc_auc"] < 1.0 - SETTINGS.rollback_margin
    assert (events[1]["from_version"], events[1]["to_version"]) == (2, 1)
    assert f"previous champion 1 {figures['previous_roc_auc']:.5f} vs 2 {figures['champion_roc_auc']:.5f}" \
        in events[1]["reason"]
    assert (ws.model_repository / MODEL / "1").is_dir()
    assert re.search(r"specific \{\s*versions: 1\s*\}", (ws.model_repository / MODEL / "config.pbtxt").read_text())

    again = run_loop_once(MODEL, end, ws, SETTINGS)  # version 1 was not promoted by the loop: no second rollback
    assert again.steps[0]["step"] == "monitor" and registry.aliases(MODEL)["champion"] == 1, again.lines()


def test_a_promoted_champion_as_good_on_its_next_window_is_kept(tmp_path, tracking):
    ws, end = _promoted_by_the_loop(tmp_path / "ws")
    _serve_next_window(ws, end, ranked_by=2)
    outcome = run_loop_once(MODEL, end, ws, SETTINGS)

    assert outcome.decision != "rolled_back" and registry.aliases(MODEL)["champion"] == 2, outcome.lines()
    assert outcome.steps[0]["step"] == "rollback" and outcome.steps[0]["summary"].startswith("kept version 2")
    assert outcome.steps[1]["step"] == "monitor"  # the run went on as today
    kept = next(e for e in _events(ws) if e["event"] == "loop_rollback")["metrics"]["rollback"]
    assert kept["champion_roc_auc"] == 1.0 and kept["previous_roc_auc"] < 1.0
    assert not any(e["event"] == "rollback" for e in _events(ws))


def test_too_few_labels_since_the_promotion_give_no_rollback_verdict(tmp_path, tracking):
    ws, end = _promoted_by_the_loop(tmp_path / "ws")
    _serve_next_window(ws, end, ranked_by=1, labelled=20)  # min_labels is 50
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "TREEOPS_WORKSPACE")}}
    proc = subprocess.run([TREEOPS, "loop", "--once", "--workspace", str(ws.root), "--window", "2h",
                           "--gate-window", "30m", "--end", end.isoformat(), "--json"],
                          capture_output=True, text=True, timeout=300, env={**env, "TREEOPS_GATE_MIN_LABELS": "50"})
    printed = json.loads(proc.stdout)
    steps = printed.get("steps") or []
    assert steps and steps[0]["step"] == "rollback", (proc.returncode, proc.stdout, proc.stderr)
    assert "no verdict on version 2" in steps[0]["summary"] and "20 labelled" in steps[0]["summary"]
    assert printed["decision"] != "rolled_back" and registry.aliases(MODEL)["champion"] == 2
    assert not any(e["event"] == "rollback" for e in _events(ws))


@pytest.fixture(scope="module")
def exported_v1(tmp_path_factory) -> Workspace:
    """A small champion v1, registered and exported; nothing logged. Tests use copies (`_copy`)."""
    ws = Workspace(tmp_path_factory.mktemp("exported-v1"))
    data = write_transactions(generate_transactions(GenerateSpec(rows=1_000, seed=3)), ws.data_dir / "t.parquet")
    before = mlflow.get_tracking_uri()
    train_and_register(data, "is_fraud", MODEL, params=TrainParams(num_boost_round=5, max_depth=3),
                       tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
    export_model(MODEL, ModelRepository(ws.model_repository))
    mlflow.set_tracking_uri(before)
    return ws


def _copy(ws: Workspace, root: Path) -> Workspace:
    """A copy of `ws` with the gate's copy of version 1 left in its repository, as a loop killed in its SLO run
    leaves it."""
    shutil.copytree(ws.root, root)
    copy = Workspace(root)
    shutil.copytree(copy.model_repository / MODEL, copy.model_repository / (MODEL + GATE_SUFFIX))
    return copy


class _Unloads:
    """Triton's model control (the network boundary) as Triton 2.51 answers an unload of a model it has not loaded
    (restarted since the loop died): success. Records each unload and whether the gate copy's folder was there."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.unloads = folder, []

    def unload_model(self, name: str) -> None:
        self.unloads.append((name, self.folder.is_dir()))

    def load_model(self, name: str) -> None:
        raise AssertionError("the cleanup loads nothing")

    def model_ready(self, name: str, version: int) -> bool:
        raise AssertionError("the cleanup checks nothing")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("control", ["none", "not_loaded", "unreachable"])
def test_a_pass_removes_the_gate_copy_a_killed_loop_left(exported_v1, tmp_path, tracking, caplog, control):
    ws = _copy(exported_v1, tmp_path / "ws")
    gate = ws.model_repository / (MODEL + GATE_SUFFIX)
    triton = {"none": None, "not_loaded": _Unloads(gate),
              "unreachable": AdminClient(f"127.0.0.1:{_closed_port()}", None, timeout_s=5)}[control]
    with caplog.at_level(logging.WARNING, logger="retraining.gate"):
        outcome = run_loop_once(MODEL, END, ws, SETTINGS, triton=triton)

    assert outcome.decision == "too_little_data", outcome.lines()  # nothing was logged
    assert not gate.exists() and ws.model_repository.joinpath(MODEL, "1").is_dir()
    assert [s["step"] for s in outcome.steps] == ["cleanup", "decision"]
    summary = outcome.steps[0]["summary"]
    done = {"none": f"removed {gate}", "not_loaded": f"unloaded {gate.name} from Triton and removed {gate}",
            "unreachable": f"removed {gate}; unloading it from Triton failed: cannot unload model"}[control]
    assert summary.startswith(done) and summary.endswith(" (left by a loop stopped during its gate)"), summary
    cleanup = [e for e in _events(ws) if e["event"] == "loop_cleanup"]
    assert [e["reason"] for e in cleanup] == [summary] and cleanup[0]["to_version"] == 1
    printed = json.loads(json.dumps(outcome.to_dict()))
    assert printed["monitor_exit_code"] == EXIT_NO_DATA and printed["steps"][0]["step"] == "cleanup"
    warned = [r for r in caplog.records if r.name == "retraining.gate"]
    if control == "not_loaded":
        assert triton.unloads == [(MODEL + GATE_SUFFIX, True)] and not warned  # unloaded before the folder went
    if control == "unreachable":
        assert len(warned) == 1 and "removing its folder anyway" in warned[0].getMessage()

    again = run_loop_once(MODEL, END, ws, SETTINGS, triton=triton)
    assert [s["step"] for s in again.steps] == ["decision"], again.lines()  # no copy: no cleanup step


def test_the_drift_report_names_a_gate_copy_as_left_by_a_stopped_loop(exported_v1, tmp_path, tracking):
    ws = _copy(exported_v1, tmp_path / "ws")
    mlflow.set_tracking_uri(ws.tracking_uri)
    repo = ModelRepository(ws.model_repository)
    line = (f"{repo.model_dir(MODEL + GATE_SUFFIX)} was left by a loop stopped during its gate: the next "
            "`treeops loop --once` removes it")
    assert check(MODEL, repo).problems == (line,)  # what `treeops models` shows
    assert warn_on_drift(repo) == [line]  # what `treeops serve` logs: no second line about `fraud-gate` itself

    shutil.rmtree(repo.model_dir(MODEL))  # a `<name>-gate` folder with no `<name>` beside it is a model of its own
    alone = warn_on_drift(repo)
    assert len(alone) == 1 and alone[0].startswith(f"{repo.model_dir(MODEL + GATE_SUFFIX)}: no registered model")
