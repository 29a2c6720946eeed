"""The promotion gate: a challenger is promoted only if it passes every check; a refusal is audited with figures.

Checks, each a function returning a `GateCheck`:
- `parity_check`: the challenger is exported as `export/pipeline.py` exports (the served target, parity gate).
- `quality_check`: on the labelled shadowed window (`retraining/shadow.py`), the challenger's ROC AUC beats the
  champion's by `margin`, judged by `mlflow.validate_evaluation_results` (MetricThreshold min_absolute_change).
- `slo_check`: a short Locust run against the challenger loaded in Triton beside the champion, as its own model
  `<model>-gate` (so no client request reaches it), with the SLO of `GateSettings`; unloaded and removed after
  (`remove_gate_copy`, which the loop also runs at the start of each pass for a copy a killed loop left).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import polars as pl
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from export.errors import ExportError
from export.repository import GATE_SUFFIX, ModelRepository
from registry.promotion import AuditLog, RegistryEvent, actor, now_iso
from registry.rollout import wait_ready
from retraining.errors import InsufficientLabelsError
from server.errors import ServerError
from treeops.errors import TreeopsError

if TYPE_CHECKING:
    from loadtest.slo import SLO

log = logging.getLogger(__name__)

METRIC = "roc_auc"


class GateSettings(BaseSettings):
    """What a challenger must show to be promoted. Env prefix `TREEOPS_GATE_`."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_GATE_", extra="forbid", frozen=True)

    margin: float = Field(0.001, gt=0, description="ROC AUC the challenger must add over the champion on the "
                          "labelled shadowed window (mlflow's min_absolute_change: positive)")
    min_labels: int = Field(100, ge=10, description="labelled shadowed predictions below which no verdict is given")
    slo_duration_s: int = Field(5, ge=1, description="seconds of Locust traffic against the loaded challenger")
    slo_users: int = Field(4, ge=1, description="concurrent Locust users")
    slo_file: Path | None = Field(None, description="SLO file (.toml/.json) of budgets; p99_ms and max_error_rate "
                                  "override it only when set explicitly (argument or environment)")
    p99_ms: float | None = Field(120.0, gt=0, description="p99 latency budget (ms) of the SLO run")
    max_error_rate: float | None = Field(0.0, ge=0, le=1, description="failed/total requests budget of the SLO run")
    load_timeout_s: float = Field(60.0, gt=0, description="how long the challenger may take to load in Triton")


@dataclass(frozen=True)
class GateCheck:
    """One check: passed or not, why, and its figures (for the audit log)."""

    name: str
    passed: bool
    why: str
    figures: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateVerdict:
    """Every check run, in order (the gate stops at the first refusal)."""

    model: str
    champion: int
    challenger: int
    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def reason(self) -> str:
        return "; ".join(f"{c.name}: {c.why}" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "champion": self.champion, "challenger": self.challenger, "passed": self.passed,
                "checks": [c.to_dict() for c in self.checks]}


class ModelControl(Protocol):
    """The Triton repository calls the SLO check needs (explicit model-control mode; server.admin.AdminClient)."""

    def load_model(self, name: str) -> None: ...

    def unload_model(self, name: str) -> None: ...

    def model_ready(self, name: str, version: int) -> bool: ...


def parity_check(model: str, repository: ModelRepository, challenger: int) -> GateCheck:
    """Export the challenger with the served version's target and raw_inputs, behind the export parity gate."""
    from export.pipeline import ExportSettings, export_version
    from export.repository import PARITY_FILE
    from registry.sync import served_export

    try:
        result = export_version(model, repository, version=challenger,
                                settings=ExportSettings(**served_export(repository, model)), keep_existing=True)
    except ExportError as exc:
        return GateCheck("parity", False, str(exc))
    stored = repository.version_dir(model, challenger) / PARITY_FILE
    report = result.parity.to_dict() if result.parity else json.loads(stored.read_text()) if stored.exists() else {}
    figures = {k: float(report[k]) for k in ("rows", "max_abs_diff", "flipped_decisions", "tolerance") if k in report}
    return GateCheck("parity", True, f"exported to {result.version_dir} "
                     f"(max |served - xgboost| {figures.get('max_abs_diff', float('nan')):.2e})", figures)


def quality_check(shadow: pl.DataFrame, labels: pl.DataFrame, settings: GateSettings) -> GateCheck:
    """Challenger vs champion ROC AUC on the labelled rows of a shadowed window (first answer per transaction).

    Raises InsufficientLabelsError when fewer than `settings.min_labels` rows, or a single class, are labelled.
    """
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException
    from sklearn.metrics import roc_auc_score

    from monitoring.labels import ID, LABEL, join_labels

    first = shadow.filter(pl.col(ID).is_not_null()).unique(ID, keep="first", maintain_order=True)
    joined = join_labels(first, labels).filter(pl.col(LABEL).is_not_null())
    y = joined[LABEL].cast(pl.Int8).to_numpy()
    if len(y) < settings.min_labels or len(np.unique(y)) < 2:
        raise InsufficientLabelsError(
            f"{len(y):,} labelled shadowed predictions ({int(y.sum()) if len(y) else 0} positive) of {shadow.height:,}; "
            f"the gate needs at least {settings.min_labels:,} and both classes: widen the window or ingest labels "
            "with `treeops labels`. Nothing was promoted")
    figures = {"labelled": float(len(y)), "margin": settings.margin,
               "champion_roc_auc": float(roc_auc_score(y, joined["champion_score"].to_numpy())),
               "challenger_roc_auc": float(roc_auc_score(y, joined["challenger_score"].to_numpy()))}
    seen = (f"ROC AUC on {len(y):,} labelled shadowed predictions: challenger {figures['challenger_roc_auc']:.5f} vs "
            f"champion {figures['champion_roc_auc']:.5f} (margin {settings.margin})")
    thresholds = {METRIC: MetricThreshold(min_absolute_change=settings.margin, greater_is_better=True)}
    try:
        mlflow.validate_evaluation_results(thresholds, EvaluationResult({METRIC: figures["challenger_roc_auc"]}, {}),
                                           EvaluationResult({METRIC: figures["champion_roc_auc"]}, {}))
    except ModelValidationFailedException as exc:
        return GateCheck("quality", False, f"{seen}: {exc.message}", figures)
    return GateCheck("quality", True, seen, figures)


def slo_check(model: str, repository: ModelRepository, challenger: int, feeds: Mapping[str, np.ndarray],
              triton: ModelControl | None, *, grpc_url: str | None, out_dir: Path,
              settings: GateSettings) -> GateCheck:
    """Load the exported challenger as `<model>-gate` in Triton, run Locust against it with `feeds` (request
    inputs by name, one row per request), then unload it and remove its folder."""
    from export.pipeline import version_signature, write_served_config
    from export.triton_config import ServingSettings
    from loadtest.rows import write_sample_rows
    from loadtest.runner import LoadtestSettings, run_loadtest

    if triton is None or grpc_url is None:
        return GateCheck("slo", False, "no running Triton was given (--triton-url): the challenger's latency cannot be "
                         "measured, so it is not promoted")
    name = model + GATE_SUFFIX
    shutil.rmtree(repository.model_dir(name), ignore_errors=True)
    shutil.copytree(repository.version_dir(model, challenger), repository.version_dir(name, challenger))
    write_served_config(name, repository, [challenger], {}, ServingSettings())
    try:
        triton.load_model(name)
        wait_ready(triton, name, (challenger,), settings.load_timeout_s)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = run_loadtest(LoadtestSettings(
            rows_path=write_sample_rows(feeds, out_dir / "rows.npz"), out_dir=out_dir, grpc_url=grpc_url, model=name,
            signature=version_signature(repository, model, challenger), users=settings.slo_users,
            duration_s=settings.slo_duration_s, slo=slo_budgets(settings)))
    except TreeopsError as exc:  # a load that failed, Locust that broke, a bad SLO file
        return GateCheck("slo", False, f"the SLO run against {name!r} version {challenger} failed: {exc}")
    finally:
        remove_gate_copy(model, repository, triton)
    a = result.aggregate
    figures = {"requests": float(a.requests), "failures": float(a.failures), "rps": a.rps,
               **{k: v for k, v in (("p50_ms", a.p50_ms), ("p99_ms", a.p99_ms)) if v is not None}}
    shown = ", ".join(f"{c.name} {c.measured} ({c.op} {c.budget}) {'ok' if c.passed else 'MISSED'}" for c in result.checks)
    return GateCheck("slo", result.passed, f"{settings.slo_duration_s}s of Locust on {name} version {challenger}: "
                     f"{a.requests} requests, {a.failures} failed; {shown} (report {result.html_report})", figures)


def remove_gate_copy(model: str, repository: ModelRepository, triton: ModelControl | None) -> str:
    """Unload `<model>-gate` from Triton (when a client is given) and remove its folder; returns what was done.

    Triton (2.51) answers the unload of a model it has not loaded, e.g. after a restart, with success; a failed
    unload is logged as a warning and does not stop the removal.
    """
    name = model + GATE_SUFFIX
    folder = repository.model_dir(name)
    done = f"removed {folder}"
    if triton is not None:
        try:
            triton.unload_model(name)
            done = f"unloaded {name} from Triton and {done}"
        except ServerError as exc:
            log.warning("unloading %s failed: %s; removing its folder anyway", name, exc)
            done += f"; unloading it from Triton failed: {exc}"
    shutil.rmtree(folder, ignore_errors=True)
    return done


def slo_budgets(settings: GateSettings) -> SLO:
    """The SLO of the gate's run: the file's budgets, with p99_ms and max_error_rate where set explicitly (or, without
    a file, their defaults)."""
    from loadtest.slo import SLO

    budgets = SLO.from_file(settings.slo_file).model_dump(exclude_none=True) if settings.slo_file else {}
    budgets.update({k: getattr(settings, k) for k in ("p99_ms", "max_error_rate") if getattr(settings, k) is not None
                    and (settings.slo_file is None or k in settings.model_fields_set)})
    return SLO(**budgets)


def record_verdict(audit: AuditLog, verdict: GateVerdict) -> RegistryEvent:
    """Append the verdict (`gate_passed` or `gate_refused`, every check's figures) to the audit log."""
    event = RegistryEvent("gate_passed" if verdict.passed else "gate_refused", verdict.model, verdict.champion,
                          verdict.challenger, actor(), now_iso(), verdict.reason,
                          metrics={c.name: dict(c.figures) for c in verdict.checks})
    audit.append(event)
    return event
