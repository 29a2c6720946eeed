"""`treeops retrain`: a challenger trained with the champion's parameters on recent data, registered as @challenger
with lineage tags (`lineage.*` on the model version and its run: source, log window, rows, labels, trigger).

From the prediction log, the challenger keeps the champion's fitted features (spec and vocabularies): the logged
features are encoded with them, so both versions score the same inputs. From a file, training runs as `treeops
train` does (data contract, features fitted on the file).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import xgboost as xgb
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from monitoring.monitor import MonitorPaths, with_stateless_features
from retraining.dataset import LoggedTrainingSet, logged_training_set
from retraining.errors import InsufficientLabelsError, RetrainError
from training import tracking
from training.features import FittedFeatures, load_fitted
from training.objectives import Objective
from training.train import RAW_HOLDOUT_ROWS, TrainParams, TrainResult, fit_booster, xgb_safe

log = logging.getLogger(__name__)

LINEAGE_PREFIX = "lineage."


class RetrainSettings(BaseSettings):
    """How much labelled traffic a retrain needs. Env `TREEOPS_RETRAIN_`."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_RETRAIN_", extra="forbid", frozen=True)

    min_labels: int = Field(200, ge=30, description="labelled predictions below which no challenger is trained")
    min_per_class: int = Field(10, ge=1, description="labels of the rarer class below which none is trained")


@dataclass(frozen=True)
class Champion:
    """The version a retrain takes its parameters (and, from the log, its features) from."""

    version: int
    run_id: str
    params: TrainParams
    fitted: FittedFeatures
    target: str
    objective: Objective


@dataclass(frozen=True)
class RetrainOutcome:
    """The registered challenger, its test metrics and the lineage recorded with it."""

    registered: tracking.RegisteredModel
    metrics: dict[str, float]
    lineage: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.registered.name, "version": self.registered.version,
                "alias": self.registered.alias, "run_id": self.registered.run_id, "metrics": self.metrics,
                "lineage": self.lineage}


def champion(model: str) -> Champion:
    """`model@champion`'s training parameters, read back from its MLflow run, and its fitted features."""
    import mlflow

    from registry import versions

    ref = versions.resolve(model, alias="champion")
    logged = mlflow.get_run(ref.run_id).data.params
    document = json.loads(mlflow.artifacts.load_text(f"runs:/{ref.run_id}/{tracking.FEATURES_ARTIFACT}"))
    objective = Objective.from_dict(document["objective"])
    try:
        params = TrainParams(
            objective=objective.kind, max_depth=int(logged["max_depth"]), learning_rate=float(logged["eta"]),
            num_boost_round=int(logged["num_boost_round"]), early_stopping_rounds=int(logged["early_stopping_rounds"]),
            subsample=float(logged["subsample"]), colsample_bytree=float(logged["colsample_bytree"]),
            min_child_weight=float(logged["min_child_weight"]), threshold=objective.threshold,
            seed=int(logged["seed"]), nthread=int(logged["nthread"]))
    except (KeyError, ValueError) as exc:
        raise RetrainError(f"the MLflow run {ref.run_id} of {model} version {ref.version} (@champion) lacks a usable "
                           f"training parameter ({exc}); retrain with `treeops train` and the parameters you want"
                           ) from exc
    return Champion(ref.version, ref.run_id, params, load_fitted(document), document["target"], objective)


def retrain_from_log(model: str, start: dt.datetime, end: dt.datetime, paths: MonitorPaths, *, tracking_uri: str,
                     artifact_root: Path | None, trigger: str | None = None,
                     settings: RetrainSettings | None = None) -> RetrainOutcome:
    """Train on the predictions logged in [start, end) that carry a label (`paths`: the log, labels, repository).

    Only versions that served with the champion's fitted features are read (another spec's codes mean other
    categories); the rows of the others are counted in the lineage.

    Raises:
        ModelNotFoundError: the model has no @champion.
        InsufficientLabelsError: too few labelled rows or a class too rare (nothing registered).
        RetrainError: the logged rows lack a feature of the champion's spec.
    """
    from monitoring.labels import read_labels
    from monitoring.prediction_log import logged_versions, read_window
    from monitoring.reference import read_reference

    settings = settings or RetrainSettings()
    tracking.configure(tracking_uri, artifact_root)
    base = champion(model)
    same, other = _versions_by_spec(model, logged_versions(paths.log_root, model), base.fitted.spec_hash())
    frames = [read_window(paths.log_root, model, start, end, version=v) for v in same]
    frames = [with_stateless_features(f, read_reference(paths.model_repository / model / str(v)))
              if f.height and _lacks_features(f, base.fitted) else f for v, f in zip(same, frames)]
    where = f"{paths.log_root}/model={model} from {start.isoformat()} to {end.isoformat()}"
    rows = pl.concat(frames, how="diagonal_relaxed").sort("arrival", "request_id", maintain_order=True) if frames \
        else pl.DataFrame()
    if not rows.height:
        raise InsufficientLabelsError(f"no logged predictions of {model} versions {same} (served with the champion's "
                                      f"features) in {where}; check --end/--window, or pass --data FILE. Nothing was "
                                      "registered")
    dataset = logged_training_set(rows, read_labels(paths.labels_dir), base.fitted, base.target,
                                  min_labels=settings.min_labels, min_per_class=settings.min_per_class, where=where)
    result = _train(dataset, base)
    skipped = sum(read_window(paths.log_root, model, start, end, version=v).height for v in other)
    lineage = {"source": "prediction_log", "log_root": str(paths.log_root), "window_start": start.isoformat(),
               "window_end": end.isoformat(), "versions": ",".join(map(str, same)), "rows_other_spec": str(skipped),
               "rows": str(dataset.counts["labelled"]), "labels": str(dataset.counts["labelled"]),
               "positives": str(dataset.counts["positives"]),
               **{f"rows_{k}": str(dataset.counts[k]) for k in ("logged", "answered", "degraded", "repeated")}}
    source = f"prediction_log:{paths.log_root}/model={model}[{start.isoformat()},{end.isoformat()})"
    registered = tracking.log_and_register(result, base.params, model, source)
    return _with_lineage(registered, result.metrics, base, lineage, trigger)


def retrain_from_file(model: str, data: Path | str, *, tracking_uri: str, artifact_root: Path | None,
                      reports_dir: Path | None = None, trigger: str | None = None) -> RetrainOutcome:
    """Train on a raw file with the champion's parameters, target and feature spec (fitted on the file)."""
    from training.pipeline import train_and_register

    tracking.configure(tracking_uri, artifact_root)
    base = champion(model)
    outcome = train_and_register(data, base.target, model, params=base.params, features=base.fitted.spec.name,
                                 tracking_uri=tracking_uri, artifact_root=artifact_root, reports_dir=reports_dir)
    lineage = {"source": "file", "data": str(data), "rows": str(sum(outcome.rows.values())),
               **{f"rows_{k}": str(v) for k, v in outcome.rows.items()}}
    return _with_lineage(outcome.registered, outcome.metrics, base, lineage, trigger)


def _versions_by_spec(model: str, logged: list[int], spec_hash: str) -> tuple[list[int], list[int]]:
    """The `logged` versions that served with `spec_hash`, and the others (a version no longer in the registry among
    them)."""
    import mlflow

    from export.errors import ModelNotFoundError
    from registry import versions

    same = []
    for v in logged:
        try:
            run_id = versions.resolve(model, version=v).run_id
        except ModelNotFoundError:
            continue
        if mlflow.get_run(run_id).data.tags.get("feature_spec_hash") == spec_hash:
            same.append(v)
    return same, [v for v in logged if v not in same]


def _lacks_features(rows: Any, fitted: FittedFeatures) -> bool:
    from monitoring.reference import feature_column

    return any(feature_column(name) not in rows.columns for name in fitted.spec.names)


def _train(dataset: LoggedTrainingSet, base: Champion) -> TrainResult:
    """The champion's parameters on the logged matrix: the newest rows are validation and test, as in training."""
    params, n = base.params, len(dataset.labels)
    n_test, n_valid = int(n * params.test_fraction), int(n * params.valid_fraction)
    n_train = n - n_test - n_valid
    slices = {"train": slice(0, n_train), "valid": slice(n_train, n_train + n_valid), "test": slice(n_train + n_valid, n)}
    for name, part in slices.items():
        if len(set(dataset.labels[part].tolist())) < 2:
            raise InsufficientLabelsError(
                f"the {name} slice of the labelled predictions ({len(dataset.labels[part]):,} rows, by arrival) holds "
                "a single class; widen --window or wait for more labels. Nothing was registered")
    names = [xgb_safe(name) for name in base.fitted.spec.names]
    booster = fit_booster(dataset.matrix, dataset.labels, names, params, base.objective, slices["train"], slices["valid"])
    test = slices["test"]
    pred = booster.predict(xgb.DMatrix(dataset.matrix[test], feature_names=names))
    metrics = base.objective.metrics(dataset.labels[test], pred)
    metrics["best_iteration"] = float(booster.num_boosted_rounds() - 1)
    raw = dataset.raw.slice(n_train + n_valid, RAW_HOLDOUT_ROWS) if dataset.raw.height else dataset.raw
    log.info("retrained on %d labelled predictions: %d trees, test %s %.4f", n, booster.num_boosted_rounds(),
             base.objective.primary_metric, metrics[base.objective.primary_metric])
    return TrainResult(booster, base.target, base.objective, base.fitted, metrics,
                       dataset.computed.slice(n_train + n_valid), raw, pred,
                       {"train": n_train, "valid": n_valid, "test": n_test})


def _with_lineage(registered: tracking.RegisteredModel, metrics: dict[str, float], base: Champion,
                  lineage: dict[str, str], trigger: str | None) -> RetrainOutcome:
    """Record the lineage as `lineage.*` tags on the registered version and its run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    lineage = {**lineage, "champion_version": str(base.version), "champion_run_id": base.run_id,
               "trigger": trigger or "manual"}
    for key, value in lineage.items():
        client.set_model_version_tag(registered.name, str(registered.version), LINEAGE_PREFIX + key, value)
        client.set_tag(registered.run_id, LINEAGE_PREFIX + key, value)
    log.info("registered %s version %d as @%s from %s (trigger %s)", registered.name, registered.version,
             registered.alias, lineage["source"], lineage["trigger"])
    return RetrainOutcome(registered, metrics, lineage)
