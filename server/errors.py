"""Errors raised by the server area; each names what is wrong and how to fix it."""

from __future__ import annotations


class ServerError(Exception):
    """Base class for serving failures the CLI reports without a traceback."""


class TritonNotFoundError(ServerError):
    """No tritonserver binary could be found."""


class PortInUseError(ServerError):
    """A port Triton needs is taken."""


class TritonStartError(ServerError):
    """Triton exited or did not become ready in time."""


class ScoringError(ServerError):
    """A scoring request failed or the input rows are unusable."""
