"""MLflow tracking and registry: log a training run, register the model, set aliases."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from registry.aliases import CHALLENGER, CHAMPION
from training.errors import TrackingError
from training.train import TrainParams, TrainResult

log = logging.getLogger(__name__)

EXPERIMENT = "treeops"
FEATURES_ARTIFACT = "features/feature_spec.json"
HOLDOUT_ARTIFACT = "holdout/holdout.parquet"
RAW_HOLDOUT_ARTIFACT = "holdout/raw.parquet"
MODEL_ARTIFACT = "model"
CONTRACT_ARTIFACT = "contract/violations.json"
#: What loading the logged booster with MLflow needs, pinned to the installed versions. Given, so MLflow does not
#: infer them by importing the model in a subprocess (8 of the 15 s a small registration took).
MODEL_REQUIREMENTS = ("mlflow", "xgboost", "numpy", "pandas", "scipy")


@dataclass(frozen=True)
class RegisteredModel:
    """Where a training run ended up in the registry."""

    name: str
    version: int
    alias: str
    run_id: str
    model_uri: str


def configure(tracking_uri: str, artifact_root: Path | None) -> str:
    """Point MLflow at `tracking_uri` and make sure the experiment exists; returns its id.

    With an embedded store the experiment gets `artifact_root` as artifact location, so artifacts
    land in the workspace instead of `./mlruns` of whatever directory the process ran in.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    if artifact_root is not None:
        artifact_root.mkdir(parents=True, exist_ok=True)
    return mlflow.create_experiment(EXPERIMENT, artifact_location=location)


def model_requirements() -> list[str]:
    """`MODEL_REQUIREMENTS` as `name==installed version`."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS]


def log_and_register(
    result: TrainResult,
    params: TrainParams,
    model_name: str,
    data_source: str,
    data_sample: pl.DataFrame | None = None,
    contract: dict | None = None,
    run_id: str | None = None,
) -> RegisteredModel:
    """Log params, metrics, feature spec, holdout and model in one run; register and alias it.

    The first version of a model becomes `champion`; later ones become `challenger`. A failure
    inside the run marks the run FAILED, and registration only happens after every artifact
    is logged, so the registry never points at a run with missing files.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    # `run_id` resumes a run the caller opened (the dask engine records its cluster there first).
    started = (mlflow.start_run(run_id=run_id) if run_id else
               mlflow.start_run(experiment_id=mlflow.get_experiment_by_name(EXPERIMENT).experiment_id))
    with started as run:
        mlflow.log_params({**params.booster_params(result.objective), "num_boost_round": params.num_boost_round,
                           "early_stopping_rounds": params.early_stopping_rounds, "data_source": data_source})
        mlflow.log_params({f"rows_{k}": v for k, v in result.rows.items()})
        if data_sample is not None and not data_source.startswith("s3://"):
            mlflow.log_input(mlflow.data.from_polars(data_sample, source=data_source, digest=file_digest(data_source),
                                                     name=Path(data_source).name, targets=result.target),
                             context="training")
        mlflow.log_metrics(result.metrics)
        mlflow.set_tags({"feature_spec": result.features.spec.name, "feature_spec_hash": result.features.spec_hash(),
                         "target": result.target})
        mlflow.log_dict(features_document(result), FEATURES_ARTIFACT)
        if contract is not None:
            mlflow.log_dict(contract, CONTRACT_ARTIFACT)
        with tempfile.TemporaryDirectory() as tmp:
            for frame, artifact in ((result.holdout, HOLDOUT_ARTIFACT), (result.raw_holdout, RAW_HOLDOUT_ARTIFACT)):
                path = Path(tmp) / Path(artifact).name
                frame.write_parquet(path)
                mlflow.log_artifact(str(path), Path(artifact).parent.as_posix())
        _log_lineage(result)
        info = mlflow.xgboost.log_model(result.booster, name=MODEL_ARTIFACT, model_format="json",
                                        pip_requirements=model_requirements())
        run_id = run.info.run_id
    try:
        mv = mlflow.register_model(info.model_uri, model_name, tags={"run_id": run_id})
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"registering model {model_name!r} from run {run_id} failed: {exc}") from exc
    version = int(mv.version)
    aliases = client.get_registered_model(model_name).aliases
    alias = CHALLENGER if CHAMPION in aliases else CHAMPION
    client.set_registered_model_alias(model_name, alias, str(version))
    log.info("registered %s version %d as %s (run %s)", model_name, version, alias, run_id)
    return RegisteredModel(model_name, version, alias, run_id, f"models:/{model_name}/{version}")



def features_document(result: TrainResult) -> dict:
    """The fitted feature spec plus the target and its objective: what serving needs to know."""
    return {**result.features.to_dict(), "target": result.target, "objective": result.objective.to_dict()}


def file_digest(path: str) -> str:
    """SHA-256 of a local file's bytes (first 16 hex digits), streamed; the dataset's identity."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _log_lineage(result: TrainResult) -> None:
    """Git commit, package versions and the figures of the run."""
    import mlflow
    import matplotlib.pyplot as plt

    from training.plots import classifier_figures

    mlflow.set_tag("git_commit", _git_commit())
    mlflow.log_dict(_package_versions(), "environment/packages.json")
    if result.objective.kind != "binary":
        return
    y = result.objective.encode_labels(result.holdout[result.target])
    for name, fig in classifier_figures(y, result.test_predictions, result.booster).items():
        mlflow.log_figure(fig, f"plots/{name}")
        plt.close(fig)


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else "unknown"


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    names = ("xgboost", "polars", "numpy", "onnxmltools", "onnxruntime", "mlflow", "scikit-learn", "nvidia-pytriton")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = sys.version.split()[0]
    return versions
