"""Errors raised by the training area; each message names what is wrong and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from training.contract import ContractReport


class TrainingError(Exception):
    """Base class for every training failure the CLI reports without a traceback."""


class DataError(TrainingError):
    """The input data cannot be used: missing file, wrong type, missing or bad column."""


class TrackingError(TrainingError):
    """MLflow tracking or registration failed."""


class ContractViolationError(DataError):
    """The input data breaks error-level rules of its data contract; `report` lists every failed rule."""

    def __init__(self, report: ContractReport, saved: Path | None = None) -> None:
        self.report = report
        self.saved = saved
        where = f"full report: {saved}" if saved else f"`treeops validate --data {report.source}` lists example rows"
        super().__init__(f"{report.summary()}; fix the data ({where})")


class DistributedError(TrainingError):
    """The Dask cluster cannot be reached or lost its workers."""
