"""Errors raised by the training area; each message names what is wrong and the fix."""

from __future__ import annotations


class TrainingError(Exception):
    """Base class for every training failure the CLI reports without a traceback."""


class DataError(TrainingError):
    """The input data cannot be used: missing file, wrong type, missing or bad column."""


class TrackingError(TrainingError):
    """MLflow tracking or registration failed."""
