"""Load-test the served model: request rows built for its signature with its feature spec, SLO from file and flags."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from loadtest.rows import write_sample_rows
from loadtest.runner import LoadtestResult, LoadtestSettings, run_loadtest
from loadtest.slo import SLO
from server.client import request_feeds
from server.repository_view import served_features
from server.requests import read_signature
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
    """Turn up to 5,000 raw rows of `data` into the inputs the served model takes and run Locust with them.

    The inputs follow the signature Triton publishes (the feature tensor, or one input per raw field),
    computed with the served version's feature spec. Budgets: the SLO file if given, then non-None
    `overrides`; with neither, no request may fail.
    """
    _, features = served_features(repository, model_name)
    protocol = protocols[0]
    signature = read_signature(grpc_url if protocol == "grpc" else http_url, model_name, protocol)
    raw = load_raw(data, features.spec.raw_schema).head(SAMPLE_ROWS).collect()
    rows = write_sample_rows(request_feeds(signature, features, raw), out_dir / "rows.npz")
    budgets = SLO.from_file(slo_file).model_dump(exclude_none=True) if slo_file else {}
    budgets.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings = LoadtestSettings(
        rows_path=rows, out_dir=out_dir, grpc_url=grpc_url, http_url=http_url, model=model_name, signature=signature,
        protocols=protocols, users=users, duration_s=duration_s, slo=SLO(**budgets) if budgets else SLO(max_error_rate=0.0),
    )
    return run_loadtest(settings)
