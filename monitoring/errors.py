"""Exceptions raised by the monitoring package; each message says how to fix the problem."""

from __future__ import annotations

from collections.abc import Sequence

from treeops.errors import EXIT_DRIFT, TreeopsError


class MonitoringError(TreeopsError):
    """Base class for every error raised by ``monitoring``."""


class DriftInputError(MonitoringError):
    """The frames or arguments given to a drift report cannot be compared."""

    @classmethod
    def missing_columns(cls, dataset: str, missing: Sequence[str], available: Sequence[str]) -> DriftInputError:
        return cls(
            f"{dataset} data is missing column(s) {list(missing)}; it has {list(available)}. "
            f"Add the column(s) to the {dataset} frame or remove them from `columns`."
        )

    @classmethod
    def empty_frame(cls, dataset: str) -> DriftInputError:
        return cls(f"{dataset} data has no rows; pass a {dataset} frame with at least one row.")

    @classmethod
    def all_null(cls, dataset: str, column: str) -> DriftInputError:
        return cls(
            f"column `{column}` is entirely null in the {dataset} data, so its drift cannot be measured; "
            "fill it or remove it from `columns`."
        )

    @classmethod
    def not_numeric(cls, column: str, dtype: str) -> DriftInputError:
        return cls(
            f"column `{column}` has non-numeric dtype {dtype} but is not listed in `categorical`; "
            "add it to `categorical` or cast it to a numeric type."
        )


class DriftDetectedError(MonitoringError):
    """A batch drifted from the training reference (exit 3); the message names how many features and the report."""

    exit_code = EXIT_DRIFT


class DriftReportError(MonitoringError):
    """Evidently's output lacks a result this package relies on (usually an Evidently version change)."""
