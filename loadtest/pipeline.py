"""Load-test the served model: request rows built for its signature with its feature spec, SLO from file and flags."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import polars as pl

from export.repository import ModelRepository
from loadtest.errors import RowsFileError
from loadtest.rows import write_sample_rows
from loadtest.runner import LoadtestResult, LoadtestSettings, run_loadtest
from loadtest.slo import SLO
from server.client import request_feeds
from server.repository_view import served_features
from server.requests import read_signature
from training.ingest import load_raw
from training.tracking import RAW_HOLDOUT_ARTIFACT

SAMPLE_ROWS = 5_000


def loadtest_served_model(
    repository: Path,
    model_name: str,
    data: Path | None,
    out_dir: Path,
    *,
    grpc_url: str,
    http_url: str,
    protocols: tuple[str, ...],
    users: int,
    duration_s: int,
    slo_file: Path | None = None,
    overrides: Mapping[str, float | None] | None = None,
) -> LoadtestResult:
    """Turn up to 5,000 raw rows of `data` into the inputs the served model takes and run Locust with them.

    Without `data`, the rows are the served version's raw holdout, read from its MLflow run (the
    tracking URI must be set).

    The inputs follow the signature Triton publishes (the feature tensor, or one input per raw field),
    computed with the served version's feature spec. Budgets: the SLO file if given, then non-None
    `overrides`; with neither, no request may fail.
    """
    version, features = served_features(repository, model_name)
    protocol = protocols[0]
    signature = read_signature(grpc_url if protocol == "grpc" else http_url, model_name, protocol)
    if data is None:
        raw = raw_holdout(repository, model_name, version).head(SAMPLE_ROWS)
    else:
        raw = load_raw(data, features.spec.raw_schema).head(SAMPLE_ROWS).collect()
    rows = write_sample_rows(request_feeds(signature, features, raw), out_dir / "rows.npz")
    budgets = SLO.from_file(slo_file).model_dump(exclude_none=True) if slo_file else {}
    budgets.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings = LoadtestSettings(
        rows_path=rows, out_dir=out_dir, grpc_url=grpc_url, http_url=http_url, model=model_name, signature=signature,
        protocols=protocols, users=users, duration_s=duration_s, slo=SLO(**budgets) if budgets else SLO(max_error_rate=0.0),
    )
    return run_loadtest(settings)


def raw_holdout(repository: Path, model_name: str, version: int) -> pl.DataFrame:
    """The raw held-out rows logged with the run that trained repository version `version`."""
    import mlflow

    run_id = ModelRepository(repository).metadata(model_name, version)["run_id"]
    with tempfile.TemporaryDirectory(prefix="treeops-loadtest-") as scratch:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=RAW_HOLDOUT_ARTIFACT,
                                                       dst_path=scratch)
        except mlflow.exceptions.MlflowException as exc:
            raise RowsFileError(f"cannot read the raw holdout of {model_name} version {version} (run {run_id}): "
                                f"{exc}; pass --data with raw transactions instead") from exc
        return pl.read_parquet(path)
