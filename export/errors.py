"""Errors raised by export; each names what is wrong and how to fix it."""

from __future__ import annotations


class ExportError(Exception):
    """Base class for export failures the CLI reports without a traceback."""


class ModelNotFoundError(ExportError):
    """The registered model, version or alias does not exist."""


class UnsupportedModelError(ExportError):
    """The model cannot be converted faithfully (e.g. an objective the converter gets wrong)."""


class ParityError(ExportError):
    """The exported artifact does not score like the trained model."""


class RepositoryError(ExportError):
    """The Triton model repository cannot be written or is inconsistent."""


class FeatureCompileError(UnsupportedModelError):
    """A feature of the spec cannot be compiled into the raw-input ONNX graph."""
