"""Gated promotion and rollback of the `champion` alias, with an append-only audit trail."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from registry import versions as registry
from export.errors import ExportError
from export.pipeline import ExportSettings, export_version, served_config, version_signature
from export.repository import CONFIG_FILE, ModelRepository
from export.signature import ServedSignature
from registry.aliases import CHALLENGER, CHAMPION
from registry.rollout import RolloutError
from registry.sync import served_export
from training.objectives import LOWER_IS_BETTER

log = logging.getLogger(__name__)

HISTORY_TAG = "treeops.champion_history"
T = TypeVar("T")


class PromotionRefused(ExportError):
    """The challenger did not earn promotion; nothing in the registry changed."""


class SignatureChangeRefused(PromotionRefused):
    """The challenger takes or returns other tensors than the served model; clients would fail."""


@dataclass(frozen=True)
class RegistryEvent:
    """One promotion or rollback, as written to model-version tags and the audit log."""

    event: str
    model_name: str
    from_version: int | None
    to_version: int
    actor: str
    at: str
    reason: str
    forced: bool = False
    metric: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AuditLog:
    """Append-only JSON-lines file of registry events."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, event: RegistryEvent) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(event.to_dict(), sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def compare_on_holdout(model_name: str, champion: int, challenger: int) -> dict[str, dict[str, float]]:
    """Score both versions on the challenger's held-out rows; returns metrics per role."""
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="treeops-promote-") as scratch:
        chall = registry.load_bundle(registry.resolve(model_name, version=challenger), Path(scratch) / "c")
        champ = registry.load_bundle(registry.resolve(model_name, version=champion), Path(scratch) / "p")
    if champ.objective.kind != chall.objective.kind or champ.objective.classes != chall.objective.classes:
        raise ExportError(f"versions {champion} and {challenger} of {model_name!r} predict different things "
                          f"({champ.objective.to_dict()} vs {chall.objective.to_dict()}); they cannot be compared")
    y = chall.objective.encode_labels(chall.holdout[chall.target])
    for role, bundle in ((CHAMPION, champ), (CHALLENGER, chall)):
        pred = np.asarray(bundle.booster.inplace_predict(bundle.fitted.matrix(chall.holdout)))
        out[role] = bundle.objective.metrics(y, pred)
    return out


def promote(
    model_name: str,
    repository: ModelRepository,
    audit: AuditLog,
    *,
    metric: str | None = None,
    margin: float = 0.0,
    force: bool = False,
    reason: str = "",
    settings: ExportSettings | None = None,
    allow_signature_change: bool = False,
    deploy: Callable[[], T] | None = None,
) -> tuple[RegistryEvent, T | None]:
    """Move `challenger` to `champion` if it beats the champion by `margin` on `metric` and passes parity.

    `metric` defaults to ROC AUC for classifiers and RMSE for regression.

    The challenger is exported through the parity gate first (a version that cannot be served
    is never promoted, `force` or not); without `settings` it takes the served version's target
    and raw_inputs. A challenger whose signature differs from the served config's is refused
    unless `allow_signature_change`. `force` skips only the metric comparison and is recorded.
    `deploy` (a rollout) runs once the aliases moved; if it fails, the aliases and the history
    are put back exactly as they were and the error is raised. Returns the event and what
    `deploy` returned.
    """
    from mlflow.tracking import MlflowClient

    challenger = registry.resolve(model_name, alias=CHALLENGER)
    champion = registry.resolve(model_name, alias=CHAMPION)
    settings = settings or ExportSettings(**served_export(repository, model_name))
    export_version(model_name, repository, version=challenger.version, settings=settings, keep_existing=True)
    if not allow_signature_change:
        _require_same_signature(repository, model_name, challenger.version)
    metrics = compare_on_holdout(model_name, champion.version, challenger.version)
    metric = metric or _primary_metric(metrics)
    if metric not in metrics[CHAMPION]:
        raise ExportError(f"unknown metric {metric!r}; choose one of {sorted(metrics[CHAMPION])}")
    old, new = metrics[CHAMPION][metric], metrics[CHALLENGER][metric]
    gain = old - new if metric in LOWER_IS_BETTER else new - old
    if gain < margin and not force:
        raise PromotionRefused(
            f"challenger version {challenger.version} does not beat champion version {champion.version} on {metric}: "
            f"{new:.5f} vs {old:.5f} (needs an improvement of at least {margin}); use --force to override, "
            "which is recorded"
        )
    event = RegistryEvent("promote", model_name, champion.version, challenger.version, actor(), now_iso(),
                          reason or f"{metric} {old:.5f} -> {new:.5f}", force and gain < margin, metric, metrics)
    client = MlflowClient()
    history = _history(client, model_name) + [champion.version]
    deployed = _move_champion(client, model_name, challenger.version, history, deploy, drop_challenger=True)
    _record(client, audit, event)
    log.info("promoted %s version %d to champion (was %d)", model_name, challenger.version, champion.version)
    return event, deployed


def rollback(model_name: str, audit: AuditLog, *, reason: str = "",
             deploy: Callable[[], T] | None = None) -> tuple[RegistryEvent, T | None]:
    """Point `champion` back at the previous champion recorded by `promote`; `deploy` as in `promote`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    champion = registry.resolve(model_name, alias=CHAMPION)
    history = _history(client, model_name)
    if not history:
        raise ExportError(f"model {model_name!r} has no previous champion to roll back to (no promotion recorded)")
    previous = history.pop()
    registry.resolve(model_name, version=previous)  # still registered?
    event = RegistryEvent("rollback", model_name, champion.version, previous, actor(), now_iso(),
                          reason or f"rollback from version {champion.version}")
    deployed = _move_champion(client, model_name, previous, history, deploy, drop_challenger=False)
    _record(client, audit, event)
    log.info("rolled %s champion back from version %d to %d", model_name, champion.version, previous)
    return event, deployed


def _require_same_signature(repository: ModelRepository, model_name: str, version: int) -> None:
    """Refuse `version` if it serves other tensors than `<model>/config.pbtxt` does (no config: nothing to break)."""
    cfg = served_config(repository, model_name)
    if cfg is None:
        return
    differences = ServedSignature.from_config(cfg).differences(version_signature(repository, model_name, version))
    if differences:
        raise SignatureChangeRefused(
            f"version {version} of {model_name!r} serves another signature than "
            f"{repository.model_dir(model_name) / CONFIG_FILE} ({'; '.join(differences)}): requests of today's "
            "clients would fail, so nothing changed. Serve it side by side under a new --model-name and move the "
            "clients, or pass --allow-signature-change to switch every client at the same moment"
        )


def _move_champion(client: Any, model_name: str, champion: int, history: list[int],
                   deploy: Callable[[], T] | None, *, drop_challenger: bool) -> T | None:
    """Point `champion` at `champion` (dropping `challenger`), record `history`, then `deploy`.

    A deploy that fails leaves the registry exactly as it was before this call.
    """
    before = registry.aliases(model_name)
    before_history = client.get_registered_model(model_name).tags.get(HISTORY_TAG)
    client.set_registered_model_alias(model_name, CHAMPION, str(champion))
    if drop_challenger:
        client.delete_registered_model_alias(model_name, CHALLENGER)
    client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history))
    if deploy is None:
        return None
    try:
        return deploy()
    except (RolloutError, ExportError) as exc:
        for alias in (CHAMPION, CHALLENGER):
            if alias in before:
                client.set_registered_model_alias(model_name, alias, str(before[alias]))
            elif alias in registry.aliases(model_name):
                client.delete_registered_model_alias(model_name, alias)
        if before_history is None:
            client.delete_registered_model_tag(model_name, HISTORY_TAG)
        else:
            client.set_registered_model_tag(model_name, HISTORY_TAG, before_history)
        kept = ", ".join(f"{a} {v}" for a, v in sorted(before.items()))
        raise type(exc)(f"{exc} -- the registry was put back as before this command ({kept}); "
                        "fix the cause and run it again") from exc


def _primary_metric(metrics: dict[str, dict[str, float]]) -> str:
    names = metrics[CHAMPION]
    return next(m for m in ("roc_auc", "rmse", "log_loss") if m in names)


def _history(client: Any, model_name: str) -> list[int]:
    tags = client.get_registered_model(model_name).tags
    return [int(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]


def _record(client: Any, audit: AuditLog, event: RegistryEvent) -> None:
    audit.append(event)
    client.set_model_version_tag(event.model_name, str(event.to_version), f"treeops.{event.event}",
                                 json.dumps({k: v for k, v in event.to_dict().items() if k != "metrics"}))
    if event.metrics:
        client.set_model_version_tag(event.model_name, str(event.to_version), "treeops.compared_metrics",
                                     json.dumps(event.metrics))


def actor() -> str:
    """Who acts, for the audit log: TREEOPS_ACTOR, else the login name."""
    return os.environ.get("TREEOPS_ACTOR") or getpass.getuser()


def now_iso() -> str:
    """Now, UTC, ISO 8601 to the second: the audit log's timestamps."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
