"""Load-test the served model: rows from the model's own feature spec, SLO from file and flags."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from loadtest.rows import write_sample_rows
from loadtest.runner import LoadtestResult, LoadtestSettings, run_loadtest
from loadtest.slo import SLO
from server.repository_view import served_features
from training.ingest import load_raw

SAMPLE_ROWS = 5_000


def loadtest_served_model(
    repository: Path,
    model_name: str,
    data: Path,
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
    """Turn up to 5,000 raw rows of `data` into the served version's features and run Locust with them.

    Budgets: the SLO file if given, then non-None `overrides`; with neither, no request may fail.
    """
    _, features = served_features(repository, model_name)
    raw = load_raw(data, features.spec.raw_schema).head(SAMPLE_ROWS).collect()
    rows = write_sample_rows(features.matrix_raw(raw), out_dir / "rows.npy")
    budgets = SLO.from_file(slo_file).model_dump(exclude_none=True) if slo_file else {}
    budgets.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings = LoadtestSettings(
        rows_path=rows, out_dir=out_dir, grpc_url=grpc_url, http_url=http_url, model=model_name,
        protocols=protocols, users=users, duration_s=duration_s, slo=SLO(**budgets) if budgets else SLO(max_error_rate=0.0),
    )
    return run_loadtest(settings)
