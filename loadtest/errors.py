"""Errors raised by the load-test area; each names what is wrong and how to fix it."""

from __future__ import annotations

from typing import Any

from treeops.errors import InvalidSettingsError, TreeopsError


class LoadtestError(TreeopsError):
    """Base class for load-test failures the CLI reports without a traceback."""


class SettingsError(LoadtestError, InvalidSettingsError):
    """The load-test settings or the locustfile's environment are unusable."""


class RowsFileError(LoadtestError):
    """The feature-row file is missing or has the wrong shape."""


class SLOError(LoadtestError, InvalidSettingsError):
    """An SLO file is missing, unreadable or has unknown or invalid keys."""


class SLOBreachError(LoadtestError):
    """A load test ran but missed a budget of its SLO (latency, error rate or throughput), or made no request."""

    @classmethod
    def of(cls, result: Any) -> SLOBreachError:
        """From a `loadtest.runner.LoadtestResult` that did not pass: the failed budgets and where the report is."""
        missed = [f"{c.name} {c.measured} (budget {c.op} {c.budget})" for c in result.checks if not c.passed]
        what = "; ".join(missed) if missed else "no request was made"
        return cls(f"load test missed its SLO: {what}; report: {result.html_report}")


class LocustRunError(LoadtestError):
    """The Locust process crashed, timed out or wrote no statistics."""


class RequestFailedError(LoadtestError):
    """One inference request failed; the message carries Triton's status and message."""
