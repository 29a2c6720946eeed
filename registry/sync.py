"""Make the Triton repository mirror the MLflow registry: alias versions exported, champion served."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry import versions as registry
from export.errors import ModelNotFoundError
from export.pipeline import ExportSettings, export_version, served_versions, write_served_config
from export.repository import ModelRepository
from registry.aliases import CHALLENGER, CHAMPION

log = logging.getLogger(__name__)


class SyncSettings(BaseSettings):
    """How a sync mirrors the registry. Env prefix `TREEOPS_SYNC_`; unknown fields fail."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_SYNC_", extra="forbid", frozen=True)

    retain_versions: int = Field(2, ge=0, description="exported versions without an alias kept on disk (newest "
                                 "first) for fast rollback")
    serve_challenger: bool = Field(False, description="also load the challenger (clients must then ask for the "
                                   "champion version explicitly: Triton answers unversioned requests with the "
                                   "highest loaded version)")
    export: ExportSettings = Field(default_factory=ExportSettings, description="how versions not yet on disk are "
                                   "exported; versions already there are served as they were exported")


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


def sync_repository(model_name: str, repository: ModelRepository, settings: SyncSettings | None = None) -> SyncResult:
    """Export every alias-carrying version (parity-gated, atomic) and point the config at the champion.

    Idempotent: a second run exports nothing and leaves the config text unchanged. Staging
    folders left by dead exports are removed.
    """
    settings = settings or SyncSettings()
    aliases = registry.aliases(model_name)
    if CHAMPION not in aliases:
        raise ModelNotFoundError(f"model {model_name!r} has no {CHAMPION!r} alias; aliases: {aliases or 'none'}")
    repository.remove_stale_staging(model_name)
    exported = []
    for alias in sorted(aliases, key=lambda a: a != CHAMPION):
        result = export_version(model_name, repository, version=aliases[alias], settings=settings.export,
                                keep_existing=True)
        if not result.already_present:
            exported.append(result.version)
    served = [aliases[CHAMPION]]
    if settings.serve_challenger and aliases.get(CHALLENGER, served[0]) != served[0]:
        served.append(aliases[CHALLENGER])
    previous = write_served_config(model_name, repository, served, aliases, settings.export.serving)
    changed = previous != repository.read_config(model_name)
    log.info("repository %s: serving %s %s, exported %s", repository.root, model_name, served, exported)
    return SyncResult(model_name, tuple(served), aliases, tuple(exported), previous, changed)


def served_export(repository: ModelRepository, model_name: str) -> dict[str, object]:
    """ExportSettings fields (target, raw_inputs) of the version the repository's config serves; {} if none.

    New versions exported by sync and promotion take them, so they keep the served signature.
    """
    served = served_versions(repository, model_name)
    if not served:
        return {}
    meta = repository.metadata(model_name, served[0])
    return {"target": meta.get("target"), "raw_inputs": bool(meta.get("raw_inputs"))}


def prune(model_name: str, repository: ModelRepository, keep: Iterable[int], retain: int) -> tuple[int, ...]:
    """Delete version folders outside `keep`, except the newest `retain` of them; returns deleted versions.

    Call only after Triton stopped serving them. Each folder is first renamed to a hidden
    name, so a crash mid-delete leaves no half version that Triton would try to load.
    """
    keep = set(keep)
    others = sorted((v for v in repository.versions(model_name) if v not in keep), reverse=True)
    doomed = others[retain:]
    for version in doomed:
        repository.remove_version(model_name, version)
    if doomed:
        log.info("pruned %s versions %s", model_name, doomed)
    return tuple(doomed)
