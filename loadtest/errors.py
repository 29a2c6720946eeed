"""Errors raised by the load-test area; each names what is wrong and how to fix it."""

from __future__ import annotations


class LoadtestError(Exception):
    """Base class for load-test failures the CLI reports without a traceback."""


class SettingsError(LoadtestError):
    """The load-test settings or the locustfile's environment are unusable."""


class RowsFileError(LoadtestError):
    """The feature-row file is missing or has the wrong shape."""


class SLOError(LoadtestError):
    """An SLO file is missing, unreadable or has unknown or invalid keys."""


class LocustRunError(LoadtestError):
    """The Locust process crashed, timed out or wrote no statistics."""


class RequestFailedError(LoadtestError):
    """One inference request failed; the message carries Triton's status and message."""
