"""The dask engine's facade: Parquet dataset -> cluster -> trained model -> registered version.

The MLflow run opens before the cluster does, so a failure at any step (unreachable scheduler,
unreadable partition, lost worker) marks the run FAILED with the reason, and registration only
happens after the run's artifacts are logged. A LocalCluster started here is closed on every path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from training import tracking
from training.dataset import file_schema, list_files, open_dataset
from training.distributed import DaskSettings, dask_client, peak_rss_mib, train_distributed
from training.errors import DistributedError, TrainingError
from training.pipeline import TrainOutcome, choose_spec_for_schema
from training.train import TrainParams

log = logging.getLogger(__name__)


def train_and_register_dask(
    data: str,
    target: str,
    model_name: str,
    *,
    settings: DaskSettings,
    entity_key: str = "card_id",
    params: TrainParams = TrainParams(),
    features: str = "auto",
    tracking_uri: str,
    artifact_root: Path | None,
) -> TrainOutcome:
    """Train on the Dask cluster of `settings` and register the version (the same format as the default engine)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    experiment_id = tracking.configure(tracking_uri, artifact_root)
    client = MlflowClient()
    run = client.create_run(experiment_id, tags={"engine": "dask", "mlflow.runName": f"dask-{model_name}"})
    run_id = run.info.run_id
    client.log_param(run_id, "engine", "dask")
    client.log_param(run_id, "scheduler", settings.scheduler or "local")
    try:
        schema = file_schema(list_files(data)[0])
        spec = choose_spec_for_schema(schema, target, features, where=data)
        dataset = open_dataset(data, {**spec.raw_schema, target: None}, entity_key)
        with dask_client(settings) as dask:
            outcome = train_distributed(dask, dataset, spec, target, entity_key, params, settings.partitions,
                                            settings.collective_timeout_s)
        client.log_param(run_id, "workers", outcome.workers)
        client.log_param(run_id, "partitions", outcome.partitions)
        for i, mib in enumerate(outcome.worker_peak_rss_mib):
            client.log_metric(run_id, f"worker_{i}_peak_rss_mib", mib)
        client.log_metric(run_id, "worker_peak_rss_mib", max(outcome.worker_peak_rss_mib, default=0.0))
        client.log_metric(run_id, "client_peak_rss_mib", round(peak_rss_mib(), 1))
        registered = tracking.log_and_register(outcome.result, params, model_name, data, run_id=run_id)
    except BaseException as exc:
        if mlflow.active_run() is not None:
            mlflow.end_run("FAILED")
        client.set_tag(run_id, "error", _one_line(exc))
        client.set_terminated(run_id, "FAILED")
        if isinstance(exc, (TrainingError, KeyboardInterrupt)):
            raise
        raise DistributedError(f"dask training failed: {_one_line(exc)}; the run {run_id} is marked FAILED") from exc
    return TrainOutcome(registered, outcome.result.metrics, outcome.result.rows)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
