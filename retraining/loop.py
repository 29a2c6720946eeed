"""`treeops loop --once`: (cleanup, rollback check) -> monitor -> (on drift or quality drop: retrain -> export ->
shadow -> gate -> promote), once.

One plain function per step (`cleanup_step`, `rollback_step`, `monitor_step`, `retrain_step`, `export_step`,
`shadow_step`, `gate_step`, `promote_step`) and `run_loop_once`, which runs them in order under a lock (`loop_lock`:
flock on `<workspace>/loop.lock`) and returns a `LoopOutcome`. Every step is appended to the audit log.

Under the lock no gate runs, so a pass first removes a `<model>-gate` copy that a loop killed during its gate left.

A champion the loop promoted is judged first, on the labelled traffic it served since its promotion: when the
champion it replaced, shadowed on that traffic, scores better by `rollback_margin`, the loop rolls back and stops.

Windows, all ending at `end`: the monitor reads [end - window, end); the challenger is trained on the labelled
predictions of [end - window, end - gate_window) and shadowed and judged on the newest [end - gate_window, end),
traffic it never trained on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from export.repository import ModelRepository
from monitoring.monitor import MonitorPaths, MonitorResult
from registry.promotion import AuditLog, RegistryEvent, actor, now_iso
from registry.rollout import ModelControl as RolloutControl
from registry.sync import SyncResult
from retraining.gate import GateCheck, GateSettings, GateVerdict, ModelControl
from retraining.retrain import RetrainOutcome
from retraining.shadow import ShadowResult
from treeops.errors import EXIT_DRIFT, EXIT_ERROR, EXIT_NO_DATA, EXIT_QUALITY, TreeopsError
from treeops.workspace import Workspace

log = logging.getLogger(__name__)

LOCK_FILE = "loop.lock"
SHADOW_DIR = "shadow"
SLO_ROWS = 5_000
Decision = Literal["nothing_to_do", "too_little_data", "refused", "promoted", "rolled_back"]


class LoopBusyError(TreeopsError):
    """Another `treeops loop` holds the workspace's lock; this one did nothing (exit 1)."""


class LoopRefused(TreeopsError):
    """The loop ran and refused the challenger (exit 1); the audit log holds the figures."""


class LoopSettings(BaseSettings):
    """Windows and limits of one loop run. Env prefix `TREEOPS_LOOP_` (the gate's: `TREEOPS_GATE_`)."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_LOOP_", extra="forbid", frozen=True)

    window: dt.timedelta = Field(dt.timedelta(days=7), description="served traffic the monitor reads and the "
                                 "challenger trains on (its newest gate_window excepted)")
    gate_window: dt.timedelta = Field(dt.timedelta(days=1), description="newest traffic the challenger is shadowed "
                                      "and judged on (not trained on)")
    retain_versions: int = Field(2, ge=0, description="exported versions without an alias kept after a promotion")
    rollback_margin: float = Field(0.005, gt=0, description="ROC AUC by which the previous champion, shadowed on the "
                                   "labelled traffic a loop-promoted champion served since its promotion, must beat "
                                   "it for the loop to roll back (positive: a tie keeps the new champion)")
    gate: GateSettings = Field(default_factory=GateSettings)


@dataclass(frozen=True)
class LoopOutcome:
    """What one run decided and why, with each step's summary."""

    model: str
    decision: Decision
    reason: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    champion: int | None = None  # after the run
    challenger: int | None = None
    verdict: GateVerdict | None = None
    monitor_exit_code: int | None = None  # `treeops monitor`'s exit code for the window; None: it did not run

    @property
    def exit_code(self) -> int:
        """0 nothing to do, promoted or rolled back (the loop did its job), 6 too little data for a verdict,
        1 refused."""
        return {"too_little_data": EXIT_NO_DATA, "refused": EXIT_ERROR}.get(self.decision, 0)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "decision": self.decision, "reason": self.reason, "exit_code": self.exit_code,
                "monitor_exit_code": self.monitor_exit_code, "champion": self.champion, "challenger": self.challenger,
                "steps": self.steps,
                "gate": self.verdict.to_dict() if self.verdict else None}

    def lines(self) -> list[str]:
        out = [f"loop {self.model}: {self.decision.replace('_', ' ')}: {self.reason}"]
        out += [f"  {s['step']}: {s['summary']}" for s in self.steps]
        return out


@contextlib.contextmanager
def loop_lock(workspace: Path) -> Iterator[Path]:
    """Hold an exclusive flock on `<workspace>/loop.lock` (released on exit, also when the process dies).

    Raises LoopBusyError at once when another process holds it.
    """
    path = workspace / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LoopBusyError(f"another `treeops loop` is running in {workspace} (it holds {path}, pid {holder}); "
                                "this one did nothing. Wait for it to finish, or give it another --workspace"
                                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def cleanup_step(model: str, repository: ModelRepository, triton: ModelControl | None) -> str | None:
    """Remove the `<model>-gate` copy a loop stopped during its gate left (unloaded from Triton first when a client
    is given); returns what was done, or None when there was none. Run under the lock only: no gate runs then."""
    from export.repository import GATE_SUFFIX
    from retraining.gate import remove_gate_copy

    if not repository.model_dir(model + GATE_SUFFIX).exists():
        return None
    return remove_gate_copy(model, repository, triton)


def monitor_step(model: str, start: dt.datetime, end: dt.datetime, paths: MonitorPaths) -> MonitorResult:
    """`treeops monitor` over [start, end) (InsufficientDataError when nothing was logged)."""
    from monitoring.monitor import MonitorSettings, run_monitor

    return run_monitor(model, start, end, paths, settings=MonitorSettings())


def retrain_step(model: str, start: dt.datetime, end: dt.datetime, ws: Workspace, paths: MonitorPaths,
                 trigger: str) -> RetrainOutcome:
    """A challenger trained on the labelled predictions of [start, end), registered @challenger."""
    from retraining.retrain import RetrainSettings, retrain_from_log

    return retrain_from_log(model, start, end, paths, tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root,
                            trigger=trigger, settings=RetrainSettings())


def export_step(model: str, repository: ModelRepository, challenger: int) -> GateCheck:
    """The challenger exported as the served version was, behind the parity gate."""
    from retraining.gate import parity_check

    return parity_check(model, repository, challenger)


def shadow_step(model: str, champion: int, challenger: int, start: dt.datetime, end: dt.datetime, ws: Workspace,
                paths: MonitorPaths) -> ShadowResult:
    """The challenger's scores of the champion's logged traffic in [start, end), stored under <workspace>/shadow."""
    from retraining.shadow import shadow_window

    return shadow_window(model, champion, challenger, start, end, paths, ws.root / SHADOW_DIR)


def gate_step(shadow: ShadowResult, repository: ModelRepository, paths: MonitorPaths, triton: ModelControl | None,
              grpc_url: str | None, out_dir: Path, settings: GateSettings,
              checks: tuple[GateCheck, ...] = ()) -> GateVerdict:
    """Quality on the shadowed window, then (if it passed) the SLO run; `checks` already run (the export) come
    first. Stops at the first refusal."""
    from monitoring.labels import read_labels
    from retraining.gate import quality_check, slo_check
    from retraining.shadow import read_shadow

    model, champion, challenger = shadow.model, shadow.champion_version, shadow.challenger_version
    done = list(checks)
    if all(c.passed for c in done):
        done.append(quality_check(read_shadow(shadow), read_labels(paths.labels_dir), settings))
    if all(c.passed for c in done):
        feeds = slo_feeds(model, repository, champion, challenger, shadow, paths)
        done.append(slo_check(model, repository, challenger, feeds, triton, grpc_url=grpc_url, out_dir=out_dir,
                              settings=settings))
    return GateVerdict(model, champion, challenger, tuple(done))


def slo_feeds(model: str, repository: ModelRepository, champion: int, challenger: int, shadow: ShadowResult,
              paths: MonitorPaths) -> dict[str, np.ndarray]:
    """Requests for the SLO run: the shadowed window's features as served (feature-tensor models), or the
    champion's raw holdout rows (raw-input models)."""
    from export.pipeline import version_signature
    from loadtest.pipeline import raw_holdout
    from retraining.shadow import logged_features
    from server.client import load_features, request_feeds

    signature = version_signature(repository, model, challenger)
    features = load_features(repository.version_dir(model, challenger))
    tensor = signature.feature_tensor
    if tensor is not None:
        _, matrix = logged_features(model, champion, shadow.start, shadow.end, paths, features.spec.names)
        return {tensor.name: matrix[:SLO_ROWS]}
    return request_feeds(signature, features, raw_holdout(repository.root, model, champion).head(SLO_ROWS))


def promote_step(model: str, repository: ModelRepository, audit: AuditLog, verdict: GateVerdict,
                 triton: RolloutControl | None, retain_versions: int) -> RegistryEvent:
    """Move @champion to the challenger the gate passed and roll it out (a running Triton switches with no failed
    request). `promote`'s own holdout comparison is recorded but does not decide: the gate did."""
    from registry.promotion import promote

    event, _ = promote(model, repository, audit, margin=float("-inf"), reason=f"gate passed: {verdict.reason}",
                       deploy=_deploy(model, repository, triton, retain_versions))
    return event


def rollback_step(model: str, champion: int, end: dt.datetime, ws: Workspace, paths: MonitorPaths,
                  repository: ModelRepository, settings: LoopSettings, triton: RolloutControl | None,
                  record: _Record) -> LoopOutcome | None:
    """Judge a champion the loop promoted on the labelled traffic it served since its promotion (inside the
    window ending at `end`): the champion it replaced scores that traffic out of band (`shadow_window`, versions
    swapped) and, if `quality_check` finds it better by `rollback_margin`, @champion moves back to it with the
    promotion's live rollout. Returns the run's outcome after a rollback; None (the run goes on) when the champion
    was not promoted by the loop, or no verdict is possible (too few labels or predictions since its promotion, the
    previous champion no longer registered; recorded as a `loop_rollback` step)."""
    from export.errors import ModelNotFoundError
    from monitoring.labels import read_labels
    from registry import versions as registry
    from registry.promotion import rollback
    from retraining.errors import InsufficientLabelsError
    from retraining.gate import quality_check
    from retraining.shadow import EmptyShadowWindow, read_shadow, shadow_window

    promotion = loop_promotion(record.audit.read(), model, champion)
    if promotion is None:
        return None
    previous, promoted_at = promotion["from_version"], dt.datetime.fromisoformat(promotion["at"])
    start = max(end - settings.window, promoted_at)
    judged = f"version {champion} (promoted over {previous} at {promotion['at']}) on {start.isoformat()} .. " \
             f"{end.isoformat()}"
    try:
        registry.resolve(model, version=previous)  # still registered?
        shadowed = shadow_window(model, champion, previous, start, end, paths, ws.root / SHADOW_DIR)
        check = quality_check(read_shadow(shadowed), read_labels(paths.labels_dir),
                              settings.gate.model_copy(update={"margin": settings.rollback_margin}))
    except (ModelNotFoundError, EmptyShadowWindow, InsufficientLabelsError) as exc:
        record.step("rollback", f"no verdict on {judged}: {exc}", champion)
        return None
    f = check.figures
    seen = (f"ROC AUC on {f['labelled']:.0f} labelled predictions of {judged}: previous champion {previous} "
            f"{f['challenger_roc_auc']:.5f} vs {champion} {f['champion_roc_auc']:.5f} (rollback margin "
            f"{settings.rollback_margin})")
    figures = {"previous_roc_auc": f["challenger_roc_auc"], "champion_roc_auc": f["champion_roc_auc"],
               "labelled": f["labelled"], "rollback_margin": settings.rollback_margin, "previous": float(previous),
               "champion": float(champion)}
    if not check.passed:
        record.step("rollback", f"kept version {champion}: {seen}", champion, {"rollback": figures})
        return None
    record.step("rollback", f"rolling back to version {previous}: {seen}", previous, {"rollback": figures})
    event, _ = rollback(model, record.audit, reason=f"loop: {seen}",
                        deploy=_deploy(model, repository, triton, settings.retain_versions))
    return record.finish("rolled_back", f"version {event.to_version} is champion again (was {event.from_version}); "
                         f"{seen}", event.to_version)


def loop_promotion(events: list[dict[str, Any]], model: str, champion: int) -> dict[str, Any] | None:
    """The audit log's `promote` event of `champion` when the loop made it (a `gate_passed` to it came first) and
    nothing moved @champion since; else None."""
    moves = [e for e in events if e["model_name"] == model and e["event"] in ("promote", "rollback")]
    if not moves or moves[-1]["event"] != "promote" or moves[-1]["to_version"] != champion:
        return None
    last = moves[-1]
    gated = any(e["model_name"] == model and e["event"] == "gate_passed" and e["to_version"] == champion
                for e in events[:events.index(last)])
    return last if gated and last["from_version"] is not None else None


def _deploy(model: str, repository: ModelRepository, triton: RolloutControl | None,
            retain_versions: int) -> Callable[[], SyncResult]:
    """The live rollout a promotion or rollback runs once @champion moved (the served export target kept)."""
    from export.pipeline import ExportSettings
    from registry.rollout import rollout
    from registry.sync import SyncSettings, served_export

    sync = SyncSettings(retain_versions=retain_versions, export=ExportSettings(**served_export(repository, model)))
    return lambda: rollout(model, repository, triton, sync)


def run_loop_once(model: str, end: dt.datetime, ws: Workspace, settings: LoopSettings | None = None, *,
                  triton: ModelControl | None = None, grpc_url: str | None = None) -> LoopOutcome:
    """One pass of the loop under the workspace's lock; every step is appended to `ws.audit_log`.

    `triton`: a model-control client of the running Triton (server.admin.AdminClient) and `grpc_url` its address,
    for the gate's SLO run and the live switch; without them no challenger can pass the gate.

    Raises:
        LoopBusyError: another loop holds the lock (nothing done).
        InvalidSettingsError: gate_window is not shorter than window.
        TreeopsError: a step failed (e.g. InBandShadowNeeded, a rollout that did not load: `promote` then puts the
            registry back); recorded first as the run's `loop_decision` event.
    """
    from registry import versions as registry
    from training import tracking
    from treeops.errors import InvalidSettingsError

    settings = settings or LoopSettings()
    if settings.gate_window >= settings.window:
        raise InvalidSettingsError(f"gate_window {settings.gate_window} must be shorter than window {settings.window}: "
                                   "the challenger trains on the window's older part")
    with loop_lock(ws.root):
        tracking.configure(ws.tracking_uri, ws.artifact_root)
        champion = registry.resolve(model, alias="champion").version
        record = _Record(model, AuditLog(ws.audit_log))
        try:
            return _one_pass(model, end, ws, settings, triton, grpc_url, champion, record)
        except TreeopsError as exc:
            last = record.steps[-1]["step"] if record.steps else "the start"
            record.step("decision", f"failed after {last}: {exc}", champion)
            raise


@dataclass
class _Record:
    """A run's steps so far; each is appended to the audit log as it happens."""

    model: str
    audit: AuditLog
    steps: list[dict[str, Any]] = field(default_factory=list)
    monitor_exit_code: int | None = None

    def step(self, name: str, summary: str, to_version: int, metrics: dict[str, dict[str, float]] | None = None) -> None:
        self.steps.append({"step": name, "summary": summary})
        self.audit.append(RegistryEvent(f"loop_{name}", self.model, None, to_version, actor(), now_iso(), summary,
                                        metrics=metrics or {}))

    def finish(self, decision: Decision, reason: str, champion: int, challenger: int | None = None,
               verdict: GateVerdict | None = None) -> LoopOutcome:
        self.step("decision", f"{decision}: {reason}", challenger or champion)
        log.info("loop %s: %s: %s", self.model, decision, reason)
        return LoopOutcome(self.model, decision, reason, list(self.steps), champion, challenger, verdict,
                           self.monitor_exit_code)


def _one_pass(model: str, end: dt.datetime, ws: Workspace, settings: LoopSettings, triton: ModelControl | None,
              grpc_url: str | None, champion: int, record: _Record) -> LoopOutcome:
    from monitoring.monitor import InsufficientDataError
    from retraining.errors import InsufficientLabelsError
    from retraining.gate import record_verdict
    from retraining.shadow import EmptyShadowWindow

    paths = MonitorPaths.in_workspace(ws.root, model)
    repository = ModelRepository(ws.model_repository)
    start, gate_start = end - settings.window, end - settings.gate_window
    cleaned = cleanup_step(model, repository, triton)
    if cleaned is not None:
        record.step("cleanup", f"{cleaned} (left by a loop stopped during its gate)", champion)
    rolled_back = rollback_step(model, champion, end, ws, paths, repository, settings, triton, record)
    if rolled_back is not None:
        return rolled_back
    try:
        watched = monitor_step(model, start, end, paths)
    except InsufficientDataError as exc:
        record.monitor_exit_code = exc.exit_code
        return record.finish("too_little_data", f"monitor: {exc}", champion)
    record.monitor_exit_code = watched.exit_code
    record.step("monitor", f"{start.isoformat()} .. {end.isoformat()}: exit {watched.exit_code} (per version "
                f"{ {v.version: v.exit_code for v in watched.versions} })", champion,
                {f"v{v.version}": {"drift_share": v.drift_share or 0.0, "labelled": v.labelled}
                 for v in watched.versions})
    if watched.exit_code not in (EXIT_DRIFT, EXIT_QUALITY):
        if watched.exit_code == EXIT_NO_DATA:
            return record.finish("too_little_data", "monitor: too little data for a verdict", champion)
        return record.finish("nothing_to_do", "monitor: no drift, no quality drop", champion)
    trigger = f"monitor {model} {start.isoformat()}..{end.isoformat()} exit {watched.exit_code}"
    try:
        retrained = retrain_step(model, start, gate_start, ws, paths, trigger)
    except InsufficientLabelsError as exc:
        return record.finish("too_little_data", f"retrain: {exc}", champion)
    challenger = retrained.registered.version
    record.step("retrain", f"version {challenger} @challenger on {retrained.lineage['rows']} labelled predictions of "
                f"{start.isoformat()} .. {gate_start.isoformat()}", challenger, {"test": retrained.metrics})
    exported = export_step(model, repository, challenger)
    record.step("export", exported.why, challenger, {"parity": exported.figures})
    if not exported.passed:
        verdict = GateVerdict(model, champion, challenger, (exported,))
        record_verdict(record.audit, verdict)
        return record.finish("refused", verdict.reason, champion, challenger, verdict)
    try:
        shadowed = shadow_step(model, champion, challenger, gate_start, end, ws, paths)
    except EmptyShadowWindow as exc:
        return record.finish("too_little_data", f"shadow: {exc}", champion, challenger)
    record.step("shadow", f"{shadowed.rows} predictions of version {champion} scored by {challenger} into "
                f"{shadowed.path}", challenger)
    try:
        verdict = gate_step(shadowed, repository, paths, triton, grpc_url, ws.reports_dir / "gate" / model,
                            settings.gate, (exported,))
    except InsufficientLabelsError as exc:
        return record.finish("too_little_data", f"gate: {exc}", champion, challenger)
    record_verdict(record.audit, verdict)
    if not verdict.passed:
        return record.finish("refused", verdict.reason, champion, challenger, verdict)
    event = promote_step(model, repository, record.audit, verdict, triton, settings.retain_versions)
    return record.finish("promoted", f"version {event.to_version} is champion (was {event.from_version}); "
                         f"{verdict.reason}", event.to_version, None, verdict)
