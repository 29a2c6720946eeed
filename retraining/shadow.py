"""Out-of-band shadow scoring: the challenger scores the features the champion logged as it served them.

When both versions share a feature spec (the same `feature_spec_hash` on their MLflow runs), the logged `feature.*`
columns are exactly the challenger's inputs, so scoring them offline is exact and costs the request path nothing.
The outputs are stored beside the champion's scores, one Parquet file per window:
`<shadow_root>/model=<m>/version=<challenger>/<start>--<end>.parquet` with request_id, transaction_id, arrival,
champion_version, champion_score and challenger_score. Versions of different specs need in-band shadowing (the
challenger computing its own features from the raw request), which is not built.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from monitoring.monitor import MonitorPaths, with_stateless_features
from monitoring.reference import feature_column
from retraining.errors import RetrainError

log = logging.getLogger(__name__)

SHADOW_COLUMNS = ("request_id", "transaction_id", "arrival", "champion_version", "champion_score", "challenger_score")


class InBandShadowNeeded(RetrainError):
    """The challenger's feature spec differs from the champion's: the logged features are not its inputs."""


class EmptyShadowWindow(RetrainError):
    """The window holds no answered prediction of the champion to shadow."""


@dataclass(frozen=True)
class ShadowResult:
    """One shadowed window: where its scores are stored and how many answered rows it holds."""

    model: str
    champion_version: int
    challenger_version: int
    start: dt.datetime
    end: dt.datetime
    rows: int
    path: Path

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "champion_version": self.champion_version,
                "challenger_version": self.challenger_version, "start": self.start.isoformat(),
                "end": self.end.isoformat(), "rows": self.rows, "path": str(self.path)}


def shadow_path(shadow_root: Path, model: str, challenger: int, start: dt.datetime, end: dt.datetime) -> Path:
    """Where the challenger's scores of the window [start, end) are stored."""
    return (shadow_root / f"model={model}" / f"version={challenger}"
            / f"{start:%Y%m%dT%H%M%SZ}--{end:%Y%m%dT%H%M%SZ}.parquet")


def shadow_window(model: str, champion: int, challenger: int, start: dt.datetime, end: dt.datetime,
                  paths: MonitorPaths, shadow_root: Path) -> ShadowResult:
    """Score the champion's answered predictions logged in [start, end) with the challenger; store both scores.

    Raises:
        InBandShadowNeeded: the versions do not share a feature spec (in-band shadowing is not built).
        EmptyShadowWindow: no answered prediction of the champion in the window.
    """
    from export.parity import reference_scores
    from registry import versions as registry

    require_same_spec(model, champion, challenger)
    with tempfile.TemporaryDirectory(prefix="treeops-shadow-") as scratch:
        bundle = registry.load_bundle(registry.resolve(model, version=challenger), Path(scratch))
    answered, matrix = logged_features(model, champion, start, end, paths, bundle.fitted.spec.names)
    scores = reference_scores(bundle.booster, matrix)[:, -1]
    out = answered.select(
        "request_id", "transaction_id", "arrival", pl.lit(champion, pl.Int64).alias("champion_version"),
        pl.col("score").alias("champion_score")).with_columns(challenger_score=pl.Series(scores, dtype=pl.Float64))
    path = shadow_path(shadow_root, model, challenger, start, end)
    _write_atomically(out, path)
    log.info("shadowed %d predictions of %s version %d with version %d into %s", out.height, model, champion,
             challenger, path)
    return ShadowResult(model, champion, challenger, start, end, out.height, path)


def logged_features(model: str, version: int, start: dt.datetime, end: dt.datetime, paths: MonitorPaths,
                    names: Sequence[str]) -> tuple[pl.DataFrame, np.ndarray]:
    """The answered predictions of `version` logged in [start, end) and their features as served (float32, in
    `names` order; a raw model's stateless features completed from its reference).

    Raises EmptyShadowWindow when the window holds none.
    """
    from monitoring.prediction_log import read_window
    from monitoring.reference import read_reference

    rows = read_window(paths.log_root, model, start, end, version=version)
    answered = rows.filter(pl.col("error").is_null() & pl.col("score").is_not_null())
    where = f"{paths.log_root}/model={model}/version={version} from {start.isoformat()} to {end.isoformat()}"
    if not answered.height:
        raise EmptyShadowWindow(f"no answered prediction of {model} version {version} in {where}; check the window "
                                "and that serving logs predictions. Nothing was stored")
    columns = [feature_column(name) for name in names]
    if any(c not in answered.columns for c in columns):  # a raw model logs only its history features
        answered = with_stateless_features(answered, read_reference(paths.model_repository / model / str(version)))
    matrix = np.ascontiguousarray(answered.select(pl.col(c).fill_null(float("nan")) for c in columns).to_numpy(),
                                  dtype=np.float32)
    return answered, matrix


def read_shadow(result: ShadowResult) -> pl.DataFrame:
    """The stored scores of a shadowed window (columns SHADOW_COLUMNS)."""
    return pl.read_parquet(result.path)


def require_same_spec(model: str, champion: int, challenger: int) -> None:
    """Raise InBandShadowNeeded unless both versions' runs carry the same `feature_spec_hash`."""
    import mlflow

    from registry import versions as registry

    hashes = {v: mlflow.get_run(registry.resolve(model, version=v).run_id).data.tags.get("feature_spec_hash")
              for v in (champion, challenger)}
    if hashes[champion] is None or hashes[champion] != hashes[challenger]:
        raise InBandShadowNeeded(
            f"{model} versions {champion} (champion, feature_spec_hash {hashes[champion]}) and {challenger} "
            f"(challenger, {hashes[challenger]}) do not share a feature spec: the champion's logged features are not "
            "the challenger's inputs, so it needs in-band shadowing (scoring the raw requests itself), which treeops "
            "does not build yet. Retrain the challenger from the log (it keeps the champion's features), or compare "
            "them with `treeops promote` on the holdout")


def _write_atomically(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
