"""Read a registered model version and its artifacts from MLflow."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import xgboost as xgb

from export.errors import ExportError, ModelFileError, ModelNotFoundError
from training.errors import DataError
from training.features import FittedFeatures, load_fitted
from training.objectives import Objective
from training.tracking import FEATURES_ARTIFACT, HOLDOUT_ARTIFACT, RAW_HOLDOUT_ARTIFACT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersionRef:
    """One registered version: `version` is the MLflow version number, `aliases` those it carries."""

    name: str
    version: int
    run_id: str
    source: str
    aliases: tuple[str, ...]


@dataclass
class ModelBundle:
    """Everything export needs from one version: the booster, its features and holdout rows."""

    ref: ModelVersionRef
    booster: xgb.Booster
    features: dict[str, Any]
    fitted: FittedFeatures
    holdout: pl.DataFrame  # computed features of the held-out rows + target
    raw_holdout: pl.DataFrame  # raw columns of the first held-out rows
    target: str
    objective: Objective


def resolve(model_name: str, alias: str | None = None, version: int | None = None) -> ModelVersionRef:
    """Find `model_name@alias` (or a numbered version); errors list what does exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    model = _registered_model(model_name)
    aliases = dict(model.aliases)
    if version is None:
        alias = alias or "champion"
        if alias not in aliases:
            raise ModelNotFoundError(
                f"model {model_name!r} has no alias {alias!r}; aliases: {aliases or 'none'} "
                "(pass --version N or set the alias)"
            )
        version = int(aliases[alias])
    try:
        mv = client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{model_name}'"))
        raise ModelNotFoundError(f"model {model_name!r} has no version {version}; versions: {versions}") from exc
    carried = tuple(sorted(a for a, v in aliases.items() if int(v) == version))
    return ModelVersionRef(model_name, version, mv.run_id, mv.source, carried)


def aliases(model_name: str) -> dict[str, int]:
    """Alias -> version of a registered model (read from the model, as version searches omit them)."""
    return {a: int(v) for a, v in _registered_model(model_name).aliases.items()}


def _registered_model(model_name: str) -> Any:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        return client.get_registered_model(model_name)
    except MlflowException as exc:
        names = [m.name for m in client.search_registered_models()]
        raise ModelNotFoundError(
            f"no registered model {model_name!r}; registered models: {names or 'none (run `treeops train` first)'}"
        ) from exc


def list_versions(model_name: str) -> list[dict[str, Any]]:
    """Every registered version, newest first, with aliases and the run's test metrics."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    by_version: dict[int, list[str]] = {}
    for alias, version in aliases(model_name).items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name='{model_name}'"), key=lambda m: -int(m.version)):
        run = mlflow.get_run(mv.run_id)
        rows.append({"version": int(mv.version), "aliases": sorted(by_version.get(int(mv.version), [])),
                     "run_id": mv.run_id, "metrics": dict(run.data.metrics), "created": mv.creation_timestamp})
    return rows


def load_bundle(ref: ModelVersionRef, scratch: Path) -> ModelBundle:
    """Download the booster, feature spec and holdout of `ref` into `scratch` and load them."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        booster = mlflow.xgboost.load_model(f"models:/{ref.name}/{ref.version}")
        feat_path = mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path=FEATURES_ARTIFACT, dst_path=str(scratch))
        hold_path = mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path=HOLDOUT_ARTIFACT, dst_path=str(scratch))
        features = json.loads(Path(feat_path).read_text())
        fitted = load_fitted(features)
        _ = features["target"], features["objective"]
        holdout = pl.read_parquet(hold_path)
        raw_path = mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path=RAW_HOLDOUT_ARTIFACT,
                                                       dst_path=str(scratch))
        raw_holdout = pl.read_parquet(raw_path)
    except xgb.core.XGBoostError as exc:  # its C++ message is a stack trace: one line naming the model instead
        raise ModelFileError.unreadable(f"the booster file of model {ref.name!r} version {ref.version} "
                                        f"({ref.source}, run {ref.run_id})", exc,
                                        "retrain it or delete the version from the registry") from exc
    except (MlflowException, OSError, ValueError, pl.exceptions.PolarsError, DataError, KeyError) as exc:
        raise ExportError(
            f"model {ref.name!r} version {ref.version} (run {ref.run_id}) has missing or corrupt artifacts: {exc}; "
            "retrain it or delete the version from the registry"
        ) from exc
    if not isinstance(booster, xgb.Booster):
        booster = booster.get_booster()
    n_model = booster.num_features()
    n_spec = len(features["features"])
    if n_model != n_spec:
        raise ExportError(
            f"model {ref.name!r} version {ref.version}: the booster takes {n_model} features but its feature spec "
            f"lists {n_spec}; the version was registered with the wrong spec"
        )
    return ModelBundle(ref, booster, features, fitted, holdout, raw_holdout, features["target"],
                       Objective.from_dict(features["objective"]))
