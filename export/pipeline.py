"""The export facade: registered version -> artifacts -> parity-checked -> repository version."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


from registry import versions as registry
from export.errors import ExportError
from export.manifest import MANIFEST_KEY, file_manifest
from export.parity import ParityReport, check_parity, gate_rows, require
from export.repository import FEATURES_FILE, METADATA_FILE, PARITY_FILE, ModelRepository, write_json
from export.raw_graph import raw_feeds, raw_inputs
from export.targets import get_target
from export.triton_config import ServingSettings, TensorSpec

log = logging.getLogger(__name__)


#: Feature-tensor models: the forest compiled to C, served by treeops' own Triton backend (fastest on CPU,
#: see README "Performance"). Raw-input models: the ONNX graph with the feature steps, in the Python backend.
DEFAULT_TARGET = "native-compiled"
RAW_INPUTS_TARGET = "python-onnx"


@dataclass(frozen=True)
class ExportSettings:
    """Target, serving shape and parity limits for one export.

    target: an export target name (export.targets.TARGETS); None picks DEFAULT_TARGET, or
    RAW_INPUTS_TARGET with `raw_inputs`.
    """

    target: str | None = None
    serving: ServingSettings = field(default_factory=ServingSettings)
    tolerance: float = 1e-5
    raw_inputs: bool = False  # serve raw transaction fields; stateless features computed in the graph

    @property
    def target_name(self) -> str:
        return self.target or (RAW_INPUTS_TARGET if self.raw_inputs else DEFAULT_TARGET)


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


def export_version(
    model_name: str,
    repository: ModelRepository,
    *,
    alias: str | None = "champion",
    version: int | None = None,
    settings: ExportSettings = ExportSettings(),
) -> ExportResult:
    """Write `model_name@alias` (or `version`) as a repository version after the parity gate passes.

    The version folder appears complete or not at all. A version already exported from the
    same MLflow run is left as it is. The model's `config.pbtxt` is not touched.
    """
    ref = registry.resolve(model_name, alias=alias, version=version)
    target = get_target(settings.target_name)
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
        return ExportResult(model_name, ref.version, ref.aliases, repository.version_dir(model_name, ref.version),
                            (), None, True)
    with tempfile.TemporaryDirectory(prefix="treeops-export-") as scratch:
        bundle = registry.load_bundle(ref, Path(scratch))
    n_features = len(bundle.fitted.spec.names)
    categorical = {i: len(bundle.fitted.vocabularies[f.name])
                   for i, f in enumerate(bundle.fitted.spec.features) if f.categorical}
    if target.n_outputs(bundle.booster) != bundle.objective.n_outputs:
        raise ExportError(
            f"{model_name} version {ref.version}: the booster has {target.n_outputs(bundle.booster)} outputs but its "
            f"objective {bundle.objective.to_dict()} expects {bundle.objective.n_outputs}; the version is inconsistent"
        )
    raw = bundle.fitted if settings.raw_inputs else None
    target.require_feature_tensor(raw)  # before any file is written
    inputs = [r.tensor_spec() for r in raw_inputs(raw)] if raw is not None else None
    with repository.stage_version(model_name, ref.version) as staging:
        target.write_artifacts(bundle.booster, n_features, staging, raw)
        if raw is not None:
            report = _raw_parity(bundle, target.raw_scorer(staging), settings.tolerance)
        elif (scorer := target.scorer(staging)) is not None:
            rows = gate_rows(bundle.booster, bundle.fitted.matrix(bundle.holdout), categorical=categorical)
            report = check_parity(bundle.booster, scorer, rows, tolerance=settings.tolerance,
                                  threshold=bundle.objective.threshold)
        if report is not None:
            write_json(staging / PARITY_FILE, report.to_dict())
            require(report, f"{settings.target_name} export of {model_name} version {ref.version}")
        write_json(staging / FEATURES_FILE, bundle.features)
        write_json(staging / METADATA_FILE, {
            "model_name": model_name,
            "version": ref.version,
            "run_id": ref.run_id,
            "target": settings.target_name,
            "n_features": n_features,
            "n_outputs": bundle.objective.n_outputs,
            "input_name": target.input_name,
            "raw_inputs": raw is not None,
            "inputs": [dataclasses.asdict(t) for t in inputs] if inputs else None,
            "output_name": target.output_name,
            "objective": bundle.objective.to_dict(),
            "aliases_at_export": list(ref.aliases),
            "feature_spec_hash": bundle.features.get("spec_hash"),
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            MANIFEST_KEY: file_manifest(staging),  # checked by the backends before they load anything
        })
    if report is not None:
        _log_parity(ref.run_id, report)
    return ExportResult(model_name, ref.version, ref.aliases, repository.version_dir(model_name, ref.version),
                        (), report, False)


def write_served_config(
    model_name: str,
    repository: ModelRepository,
    served: Sequence[int],
    aliases: Mapping[str, int],
    serving: ServingSettings,
) -> str:
    """Rewrite `<model>/config.pbtxt` to serve `served` (first = champion); returns the previous text.

    Tensor shapes and the backend come from the champion's folder metadata; the config's
    parameters name each alias's version so clients can see which model answers.
    """
    champion = served[0]
    meta = repository.metadata(model_name, champion)
    target = get_target(meta["target"])
    parameters = {f"{alias}_version": str(v) for alias, v in sorted(aliases.items())}
    parameters["feature_spec_hash"] = str(meta.get("feature_spec_hash"))
    inputs = [TensorSpec(t["name"], tuple(t["dims"]), t["data_type"]) for t in meta["inputs"]] if meta.get("inputs") else None
    cfg = target.model_config(model_name, int(meta["n_features"]), int(meta["n_outputs"]), serving, served, parameters,
                              inputs=inputs)
    previous = repository.read_config(model_name) or ""
    repository.write_config(cfg)
    return previous


def export_model(
    model_name: str,
    repository: ModelRepository,
    *,
    alias: str | None = "champion",
    version: int | None = None,
    settings: ExportSettings = ExportSettings(),
) -> ExportResult:
    """`export_version`, then serve the champion (or this version while there is no exported champion)."""
    result = export_version(model_name, repository, alias=alias, version=version, settings=settings)
    aliases = registry.aliases(model_name)
    champion = aliases.get("champion")
    served = [champion] if champion in repository.versions(model_name) else [result.version]
    write_served_config(model_name, repository, served, aliases, settings.serving)
    return dataclasses.replace(result, served_versions=tuple(served))


def _raw_parity(bundle: registry.ModelBundle, scorer, tolerance: float) -> ParityReport:
    """Raw-input graph on the held-out raw rows vs Polars features + xgboost on the same rows."""
    raw = bundle.raw_holdout
    served = scorer(raw_feeds(bundle.fitted, raw))
    return check_parity(bundle.booster, lambda _features: served, bundle.fitted.matrix_raw(raw),
                        tolerance=tolerance, threshold=bundle.objective.threshold)


def _log_parity(run_id: str, report: ParityReport) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().log_dict(run_id, report.to_dict(), f"export/{PARITY_FILE}")
