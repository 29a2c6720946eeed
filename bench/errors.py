"""Errors raised by the benchmarks; each names what is wrong and how to fix it."""

from __future__ import annotations

from treeops.errors import InvalidSettingsError, TreeopsError


class BenchError(TreeopsError):
    """Base class for benchmark failures the CLI reports in one line, without a traceback (exit 1)."""


class SettingsError(InvalidSettingsError, BenchError):
    """The benchmark settings, or the targets file, are unusable (exit 2)."""


class RequestFailedError(BenchError):
    """A benchmark request failed, or Triton's answers differ from the in-process scores."""


class PerfAnalyzerError(BenchError):
    """perf_analyzer ran but failed or wrote no report."""
