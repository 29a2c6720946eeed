"""Make the Triton repository mirror the MLflow registry: alias versions exported, champion served."""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from registry import versions as registry
from export.errors import ModelNotFoundError
from export.pipeline import ExportSettings, export_version, write_served_config
from export.repository import ModelRepository
from export.triton_config import parse
from registry.aliases import CHALLENGER, CHAMPION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncSettings:
    """retain_versions: exported versions without an alias kept on disk (newest first) for fast rollback;
    serve_challenger: also load the challenger (clients must then ask for the champion version explicitly,
    since Triton answers unversioned requests with the highest loaded version)."""

    retain_versions: int = 2
    serve_challenger: bool = False
    export: ExportSettings = field(default_factory=ExportSettings)


@dataclass(frozen=True)
class SyncResult:
    """What a sync changed: versions now served, exported, and the config text it replaced."""

    model_name: str
    served: tuple[int, ...]
    aliases: dict[str, int]
    exported: tuple[int, ...]
    previous_config: str
    config_changed: bool
    pruned: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"model_name": self.model_name, "served": list(self.served), "aliases": self.aliases,
                "exported": list(self.exported), "config_changed": self.config_changed, "pruned": list(self.pruned)}


def sync_repository(model_name: str, repository: ModelRepository, settings: SyncSettings = SyncSettings()) -> SyncResult:
    """Export every alias-carrying version (parity-gated, atomic) and point the config at the champion.

    Idempotent: a second run exports nothing and leaves the config text unchanged.
    """
    aliases = registry.aliases(model_name)
    if CHAMPION not in aliases:
        raise ModelNotFoundError(f"model {model_name!r} has no {CHAMPION!r} alias; aliases: {aliases or 'none'}")
    exported = []
    for alias in sorted(aliases, key=lambda a: a != CHAMPION):
        result = export_version(model_name, repository, version=aliases[alias], settings=settings.export)
        if not result.already_present:
            exported.append(result.version)
    served = [aliases[CHAMPION]]
    if settings.serve_challenger and aliases.get(CHALLENGER, served[0]) != served[0]:
        served.append(aliases[CHALLENGER])
    previous = write_served_config(model_name, repository, served, aliases, settings.export.serving)
    changed = previous != repository.read_config(model_name)
    log.info("repository %s: serving %s %s, exported %s", repository.root, model_name, served, exported)
    return SyncResult(model_name, tuple(served), aliases, tuple(exported), previous, changed)


def current_target(repository: ModelRepository, model_name: str) -> str | None:
    """The export target of the version the repository's config serves, if any."""
    text = repository.read_config(model_name)
    if not text:
        return None
    cfg = parse(text, source=str(repository.model_dir(model_name) / "config.pbtxt"))
    versions = list(cfg.version_policy.specific.versions)
    return repository.metadata(model_name, versions[0]).get("target") if versions else None


def prune(model_name: str, repository: ModelRepository, keep: Iterable[int], retain: int) -> tuple[int, ...]:
    """Delete version folders outside `keep`, except the newest `retain` of them; returns deleted versions.

    Call only after Triton stopped serving them. Each folder is first renamed to a hidden
    name, so a crash mid-delete leaves no half version that Triton would try to load.
    """
    keep = set(keep)
    others = sorted((v for v in repository.versions(model_name) if v not in keep), reverse=True)
    doomed = others[retain:]
    for version in doomed:
        folder = repository.version_dir(model_name, version)
        trash = folder.with_name(f".trash-{version}-{uuid.uuid4().hex[:8]}")
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        log.info("pruned %s versions %s", model_name, doomed)
    return tuple(doomed)
