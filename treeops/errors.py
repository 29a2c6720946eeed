"""The one base of every expected treeops error, and the exit code each kind of condition gets.

Each area's `errors.py` subclasses `TreeopsError`; a subclass names its condition's exit code, and
`treeops.cli.run` is the one place that turns an error into that code (and into a `--json` error object).
Imports nothing from the areas or the CLI, so every area can import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

#: Exit codes of the `treeops` command, the same for the same condition in every command.
EXIT_ERROR = 1  # an expected failure: missing file, unknown model, failed request, breached SLO, ...
EXIT_USAGE = 2  # invalid settings or arguments (an unknown --target, the same port twice, ...)
EXIT_DRIFT = 3  # drift detected in a batch
EXIT_CONTRACT = 4  # the data breaks error rules of its data contract
EXIT_QUALITY = 5  # model quality on labelled traffic fell below the version's holdout figures (treeops monitor)
EXIT_NO_DATA = 6  # too little data for a verdict: a window with too few predictions or labels (treeops monitor)
EXIT_INTERRUPTED = 130  # stopped by SIGINT / SIGTERM (128 + SIGINT, as shells report it)


class TreeopsError(Exception):
    """An expected failure, reported in one line without a traceback and exiting with `exit_code`.

    `details`: extra fields of the `--json` error object, e.g. the report that failed.
    """

    exit_code: ClassVar[int] = EXIT_ERROR
    details: Mapping[str, Any] = {}

    def with_details(self, details: Mapping[str, Any]) -> TreeopsError:
        """This error carrying `details` (the command's result) into its `--json` object."""
        self.details = dict(details)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The `--json` error object: `error` (the message), `kind` (the class), `exit_code`, then any details."""
        return {"error": str(self), "kind": type(self).__name__, "exit_code": self.exit_code, **{
            k: v for k, v in self.details.items() if k not in ("error", "kind", "exit_code")}}


class CommandInterrupted(TreeopsError):
    """The command was stopped by SIGINT or SIGTERM after cleaning up; the message says what was left."""

    exit_code = EXIT_INTERRUPTED


class InvalidSettingsError(TreeopsError):
    """Settings or arguments that cannot work; the message names the setting and its valid values."""

    exit_code = EXIT_USAGE
