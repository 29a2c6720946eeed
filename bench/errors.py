"""Errors raised by the benchmarks; each names what is wrong and how to fix it."""

from __future__ import annotations


class BenchError(Exception):
    """Base class for benchmark failures the CLI reports in one line, without a traceback."""


class SettingsError(BenchError):
    """The benchmark settings, or the targets file, are unusable."""


class RequestFailedError(BenchError):
    """A benchmark request failed, or Triton's answers differ from the in-process scores."""


class PerfAnalyzerError(BenchError):
    """perf_analyzer ran but failed or wrote no report."""
