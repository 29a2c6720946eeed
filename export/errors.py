"""Errors raised by export; each names what is wrong and how to fix it."""

from __future__ import annotations

import re

from treeops.errors import InvalidSettingsError, TreeopsError

#: xgboost's C++ messages start "[22:42:21] /__w/xgboost/src/common/json.cc:409: " and end in a stack trace.
_XGBOOST_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: (Check failed: )?")


def xgboost_reason(exc: BaseException) -> str:
    """The one line of an xgboost C++ error that says what failed, without its time, source file or stack trace."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return _XGBOOST_PREFIX.sub("", first)


class ExportError(TreeopsError):
    """Base class for export failures the CLI reports without a traceback."""


class ModelNotFoundError(ExportError):
    """The registered model, version or alias does not exist."""


class UnsupportedModelError(ExportError):
    """The model cannot be converted faithfully (e.g. an objective the converter gets wrong)."""


class ParityError(ExportError):
    """The exported artifact does not score like the trained model."""


class ModelFileError(ExportError):
    """A model file (an xgboost booster) is missing, truncated or not a model xgboost can read."""

    @classmethod
    def unreadable(cls, where: str, exc: BaseException, fix: str) -> ModelFileError:
        return cls(f"{where} is not a readable XGBoost model ({xgboost_reason(exc)}); {fix}")


class SettingsError(ExportError, InvalidSettingsError):
    """Export settings that cannot work (an unknown target, an unknown instance kind)."""


class RepositoryError(ExportError):
    """The Triton model repository cannot be written or is inconsistent."""


class FeatureCompileError(UnsupportedModelError):
    """A feature of the spec cannot be compiled into the raw-input ONNX graph."""
