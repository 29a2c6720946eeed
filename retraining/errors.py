"""Errors of a retrain; each message names what is wrong and the fix. Nothing is registered when one is raised."""

from __future__ import annotations

from treeops.errors import EXIT_NO_DATA, TreeopsError


class RetrainError(TreeopsError):
    """A retrain that cannot start: no champion to take parameters from, or logged rows of another schema."""


class InsufficientLabelsError(RetrainError):
    """Too few labelled rows, or a class too rare, to train and test a challenger (exit 6, as `monitor`'s too
    little data)."""

    exit_code = EXIT_NO_DATA
