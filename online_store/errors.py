"""Errors of the online feature store; each names what is wrong and how to fix it."""

from __future__ import annotations

from backends.online_history import redacted
from treeops.errors import InvalidSettingsError, TreeopsError


class OnlineStoreError(TreeopsError):
    """Base class of online store failures the CLI reports without a traceback."""


class RedisNotFoundError(OnlineStoreError):
    """No redis-server binary on PATH."""


class RedisStartError(OnlineStoreError):
    """A local redis-server exited or did not answer PING in time."""


class StoreUnavailableError(OnlineStoreError):
    """The configured store did not answer (connection refused, reset or timed out); the message names its URL
    without the password. `during`: what was being done; `then`: what to do after the store is back."""

    def __init__(self, url: str, cause: BaseException, during: str = "", then: str = ""):
        super().__init__(f"online store {redacted(url)} did not answer{during} ({cause}): start Redis there or set "
                         f"TREEOPS_ONLINE_STORE_URL to a running one{then}")


class NoHistoryFeaturesError(OnlineStoreError):
    """The model's feature spec declares no history feature, so there is no online state."""


class InvalidStoreArgumentError(OnlineStoreError, InvalidSettingsError):
    """An argument of a store command that cannot work (an entity the spec does not key by, a bad time)."""
