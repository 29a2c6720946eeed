"""The export facade: registered version -> artifacts -> parity-checked -> repository version."""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export import registry
from export.errors import ExportError
from export.parity import ParityReport, check_parity, edge_rows, require
from export.repository import FEATURES_FILE, METADATA_FILE, PARITY_FILE, ModelRepository, write_json
from export.targets import get_target
from export.triton_config import ServingSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSettings:
    """Target, serving shape and parity limits for one export."""

    target: str = "python-onnx"
    serving: ServingSettings = field(default_factory=ServingSettings)
    tolerance: float = 1e-5
    threshold: float = 0.5


@dataclass(frozen=True)
class ExportResult:
    """What export wrote: the repository version, its parity and whether it already existed."""

    model_name: str
    version: int
    aliases: tuple[str, ...]
    version_dir: Path
    served_versions: tuple[int, ...]
    parity: ParityReport | None
    already_present: bool

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "aliases": list(self.aliases),
            "version_dir": str(self.version_dir),
            "served_versions": list(self.served_versions),
            "parity": self.parity.to_dict() if self.parity else None,
            "already_present": self.already_present,
        }


def export_model(
    model_name: str,
    repository: ModelRepository,
    *,
    alias: str | None = "champion",
    version: int | None = None,
    settings: ExportSettings = ExportSettings(),
) -> ExportResult:
    """Export `model_name@alias` (or `version`) into `repository` after the parity gate passes.

    The version folder appears complete or not at all; `config.pbtxt` is rewritten to serve the
    champion. A version already exported from the same MLflow run is left as it is.
    """
    ref = registry.resolve(model_name, alias=alias, version=version)
    target = get_target(settings.target)
    with tempfile.TemporaryDirectory(prefix="treeops-export-") as scratch:
        bundle = registry.load_bundle(ref, Path(scratch))
    names = [f["name"] for f in bundle.features["features"]]
    n_features = len(names)
    report: ParityReport | None = None
    present = ref.version in repository.versions(model_name)
    if present:
        meta = repository.metadata(model_name, ref.version)
        if meta.get("run_id") != ref.run_id:
            raise ExportError(
                f"{repository.version_dir(model_name, ref.version)} holds run {meta.get('run_id')}, but MLflow version "
                f"{ref.version} is run {ref.run_id}: the repository belongs to another registry; use another --workspace"
            )
        log.info("version %d of %s is already in the repository", ref.version, model_name)
    else:
        holdout = bundle.fitted.matrix(bundle.holdout)
        rows = np.vstack([holdout, edge_rows(n_features, np.nanmedian(holdout, axis=0) if len(holdout) else np.zeros(0))])
        with repository.stage_version(model_name, ref.version) as staging:
            target.write_artifacts(bundle.booster, n_features, staging)
            scorer = target.scorer(staging)
            if scorer is not None:
                report = check_parity(bundle.booster, scorer, rows, tolerance=settings.tolerance, threshold=settings.threshold)
                write_json(staging / PARITY_FILE, report.to_dict())
                require(report, f"{settings.target} export of {model_name} version {ref.version}")
            write_json(staging / FEATURES_FILE, bundle.features)
            write_json(staging / METADATA_FILE, {
                "model_name": model_name,
                "version": ref.version,
                "run_id": ref.run_id,
                "target": settings.target,
                "aliases_at_export": list(ref.aliases),
                "feature_spec_hash": bundle.features.get("spec_hash"),
                "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            })
        if report is not None:
            _log_parity(ref.run_id, report)
    served = _served_versions(model_name, repository, ref)
    n_outputs = 2 if _objective(bundle) == "binary:logistic" else 1
    champion = served[-1]
    cfg = target.model_config(
        model_name, n_features, n_outputs, settings.serving, served,
        {"champion_version": str(champion), "feature_spec_hash": str(bundle.features.get("spec_hash"))},
    )
    repository.write_config(cfg)
    return ExportResult(model_name, ref.version, ref.aliases, repository.version_dir(model_name, ref.version),
                        tuple(served), report, present)


def _served_versions(model_name: str, repository: ModelRepository, exported: registry.ModelVersionRef) -> list[int]:
    """Serve the champion when its folder exists; otherwise the version just exported."""
    if "champion" in exported.aliases:
        return [exported.version]
    try:
        champion = registry.resolve(model_name, alias="champion")
    except ExportError:
        return [exported.version]
    return [champion.version] if champion.version in repository.versions(model_name) else [exported.version]


def _objective(bundle: registry.ModelBundle) -> str:
    from export.onnx_convert import objective_of

    return objective_of(bundle.booster)


def _log_parity(run_id: str, report: ParityReport) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().log_dict(run_id, report.to_dict(), f"export/{PARITY_FILE}")
