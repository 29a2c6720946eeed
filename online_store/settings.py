"""Typed settings of the online feature store (env prefix TREEOPS_ONLINE_STORE_)."""

from __future__ import annotations

from typing import Literal

import redis
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from backends.online_history import connect


class OnlineStoreSettings(BaseSettings):
    """Where the history features' Redis is and what serving does when it does not answer.

    `TREEOPS_ONLINE_STORE_URL=redis://host:6379/0` points at a running Redis; unset, `treeops serve`
    and the demo start a local redis-server in the workspace (`online_store.redis_server.LocalRedis`).
    """

    model_config = SettingsConfigDict(env_prefix="TREEOPS_ONLINE_STORE_", extra="forbid")

    url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://\S+$",
                            description="redis:// URL of the store; None: a local redis-server in the workspace")
    on_store_unavailable: Literal["error", "score_without_history"] = Field(
        "error", description="error: UNAVAILABLE naming the store URL; score_without_history: history features NaN, "
        "answer flagged degraded and counted")
    timeout_s: float = Field(1.0, gt=0, description="connect and per-reply timeout of store calls")
    retries: int = Field(1, ge=0, description="immediate reconnects on a dropped connection (safe: retries are "
                         "idempotent by transaction id)")

    def client(self, url: str | None = None) -> redis.Redis:
        """A fail-fast client for `url` (default: the configured one)."""
        target = url or self.url
        if target is None:
            raise ValueError("no store URL: set TREEOPS_ONLINE_STORE_URL or start a LocalRedis and pass its url")
        return connect(target, timeout_s=self.timeout_s, retries=self.retries)
