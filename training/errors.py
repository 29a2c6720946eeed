"""Errors raised by the training area; each message names what is wrong and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from treeops.errors import EXIT_CONTRACT, InvalidSettingsError, TreeopsError

if TYPE_CHECKING:
    from pathlib import Path

    from training.contract import ContractReport


class TrainingError(TreeopsError):
    """Base class for every training failure the CLI reports without a traceback."""


class DataError(TrainingError):
    """The input data cannot be used: missing file, wrong type, missing or bad column."""


class SettingsError(TrainingError, InvalidSettingsError):
    """Training settings that cannot work (an unknown objective, engine or feature spec)."""


class TrackingError(TrainingError):
    """MLflow tracking or registration failed."""


class ContractViolationError(DataError):
    """The input data breaks error-level rules of its data contract (exit 4, from `validate` and `train` alike);
    `report` lists every failed rule and is the `--json` error object's details."""

    exit_code = EXIT_CONTRACT

    def __init__(self, report: ContractReport, saved: Path | None = None) -> None:
        self.report = report
        self.saved = saved
        self.details = report.to_dict()
        where = f"full report: {saved}" if saved else f"`treeops validate --data {report.source}` lists example rows"
        super().__init__(f"{report.summary()}; fix the data ({where})")


class DistributedError(TrainingError):
    """The Dask cluster cannot be reached or lost its workers."""
