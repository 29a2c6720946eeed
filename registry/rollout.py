"""Roll registry changes out to a running Triton: sync the repository, reload, verify, or restore."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Protocol

from export.repository import ModelRepository
from registry.sync import SyncResult, SyncSettings, prune, sync_repository
from server.errors import ServerError

log = logging.getLogger(__name__)


class ModelControl(Protocol):
    """The repository-API calls a rollout needs (explicit model-control mode)."""

    def load_model(self, name: str) -> None: ...

    def model_ready(self, name: str, version: int) -> bool: ...


class RolloutError(ServerError):
    """The new configuration did not load; the previous one was restored and keeps serving."""


def rollout(
    model_name: str,
    repository: ModelRepository,
    triton: ModelControl | None,
    settings: SyncSettings | None = None,
    timeout_s: float = 120.0,
) -> SyncResult:
    """Sync the repository to the registry; with a Triton, load the new config and wait until it serves.

    Triton keeps serving the old version until the new one is loaded and ready, so clients see
    no failed request. If the load fails, the previous `config.pbtxt` is put back and reloaded,
    and RolloutError is raised; versions are pruned only after a successful switch.
    """
    settings = settings or SyncSettings()
    result = sync_repository(model_name, repository, settings)
    if triton is not None and (result.config_changed or result.exported):
        try:
            triton.load_model(model_name)
            wait_ready(triton, model_name, result.served, timeout_s)
        except ServerError as exc:
            repository.restore_config(model_name, result.previous_config)
            try:
                triton.load_model(model_name)
            except ServerError as again:
                log.error("re-loading the previous config of %s failed too: %s", model_name, again)
            raise RolloutError(
                f"loading {model_name} versions {list(result.served)} failed ({exc}); the previous config was "
                "restored and the versions it names keep serving. Check the Triton log for the load error."
            ) from exc
    keep = set(result.aliases.values()) | set(result.served)
    pruned = prune(model_name, repository, keep, settings.retain_versions)
    return dataclasses.replace(result, pruned=pruned)


def wait_ready(triton: ModelControl, model_name: str, versions: tuple[int, ...], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(versions)
    while pending:
        pending = [v for v in pending if not triton.model_ready(model_name, v)]
        if pending and time.monotonic() > deadline:
            raise ServerError(f"{model_name} versions {pending} not ready after {timeout_s:.0f}s")
        if pending:
            time.sleep(0.1)
