"""Errors of the online feature store; each names what is wrong and how to fix it."""

from __future__ import annotations

from treeops.errors import InvalidSettingsError, TreeopsError


class OnlineStoreError(TreeopsError):
    """Base class of online store failures the CLI reports without a traceback."""


class RedisNotFoundError(OnlineStoreError):
    """No redis-server binary on PATH."""


class RedisStartError(OnlineStoreError):
    """A local redis-server exited or did not answer PING in time."""


class StoreUnavailableError(OnlineStoreError):
    """The configured store did not answer (connection refused, reset or timed out)."""


class NoHistoryFeaturesError(OnlineStoreError):
    """The model's feature spec declares no history feature, so there is no online state."""


class InvalidStoreArgumentError(OnlineStoreError, InvalidSettingsError):
    """An argument of a store command that cannot work (an entity the spec does not key by, a bad time)."""
