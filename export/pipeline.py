"""The export facade: registered version -> artifacts -> parity-checked -> repository version."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from tritonclient.grpc import model_config_pb2 as mc

from registry import versions as registry
from export.errors import ExportError, RepositoryError
from export.manifest import MANIFEST_KEY, file_manifest
from export.parity import ParityReport, check_parity, gate_rows, reference_scores, require
from export.repository import (CONFIG_FILE, FEATURES_FILE, METADATA_FILE, PARITY_FILE, ModelRepository,
                               VersionConflictError, WrittenByAnotherRun, write_json)
from export.online import StorePolicy, is_online, online_parameters, served_inputs
from export.raw_graph import raw_feeds
from export.signature import ServedSignature
from export.targets import get_target
from export.triton_config import ServingSettings, TensorSpec, parse
from monitoring.reference import write_reference

log = logging.getLogger(__name__)


#: Feature-tensor models: the forest compiled to C, served by treeops' own Triton backend (fastest on CPU,
#: see README "Performance"). Raw-input models of a spec with history features: the same backend, reading the
#: online store with hiredis (README "Mechanism"); of a stateless spec: the ONNX graph with the feature steps, in
#: the Python backend (the C backend's raw model is the raw-transaction model, which needs a store).
DEFAULT_TARGET = "native-compiled"
RAW_INPUTS_TARGET = "native-compiled"
STATELESS_RAW_INPUTS_TARGET = "python-onnx"


class ExportSettings(BaseSettings):
    """Target, serving shape and parity limits for one export. Env prefix `TREEOPS_EXPORT_`; unknown fields fail."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_EXPORT_", extra="forbid", frozen=True)

    target: str | None = Field(None, description="an export target name (export.targets.TARGETS); None picks "
                               "DEFAULT_TARGET, or with raw_inputs RAW_INPUTS_TARGET (a spec with history "
                               "features) or STATELESS_RAW_INPUTS_TARGET")
    serving: ServingSettings = Field(default_factory=ServingSettings, description="batching and instances")
    tolerance: float = Field(1e-5, gt=0, description="largest |served - xgboost| the parity gate accepts")
    raw_inputs: bool = Field(False, description="serve raw transaction fields; stateless features computed in the graph, "
                             "history features read from the online store (export/online.py)")
    on_store_unavailable: StorePolicy = Field(
        "error", description="raw-transaction model with the online store down: 'error' (UNAVAILABLE naming the store "
        "URL) or 'score_without_history' (history features missing, answer flagged and counted)")
    replace: bool = Field(False, description="replace a version already exported with another target or raw_inputs "
                          "(atomically; refused for a version config.pbtxt serves)")

    def target_for(self, online: bool) -> str:
        """The target's name, for a spec with history features (`online`) or not."""
        if self.target or not self.raw_inputs:
            return self.target or DEFAULT_TARGET
        return RAW_INPUTS_TARGET if online else STATELESS_RAW_INPUTS_TARGET


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
    replaced: bool = False
    written_by_another_run: bool = False  # this run lost a race to write the same version, with the same settings

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "aliases": list(self.aliases),
            "version_dir": str(self.version_dir),
            "served_versions": list(self.served_versions),
            "parity": self.parity.to_dict() if self.parity else None,
            "already_present": self.already_present,
            "replaced": self.replaced,
            "written_by_another_run": self.written_by_another_run,
        }


def export_version(
    model_name: str,
    repository: ModelRepository,
    *,
    alias: str | None = "champion",
    version: int | None = None,
    settings: ExportSettings | None = None,
    keep_existing: bool = False,
) -> ExportResult:
    """Write `model_name@alias` (or `version`) as a repository version after the parity gate passes.

    Binary models also get their training reference (monitoring/reference.py: a holdout sample and its quality
    figures), which `treeops monitor` compares served traffic with.

    The version folder appears complete or not at all. A version already exported from the same
    MLflow run with the same target and raw_inputs is kept; with another target or raw_inputs it is
    refused (VersionConflictError), or replaced atomically with `settings.replace`, or kept as it
    is with `keep_existing` (sync and promotion: they serve what was exported). Stale staging
    folders of dead exports are removed first. The model's `config.pbtxt` is not touched.
    """
    settings = settings or ExportSettings()
    ref = registry.resolve(model_name, alias=alias, version=version)
    bundle = _load_bundle(ref) if settings.raw_inputs and settings.target is None else None  # its spec picks the target
    target_name = settings.target_for(bundle is not None and is_online(bundle.fitted))
    target = get_target(target_name)
    report: ParityReport | None = None
    repository.remove_stale_staging(model_name)
    final = repository.version_dir(model_name, ref.version)
    replacing = False
    if ref.version in repository.versions(model_name):
        meta = repository.metadata(model_name, ref.version)
        if meta.get("run_id") != ref.run_id:
            raise ExportError(
                f"{final} holds run {meta.get('run_id')}, but MLflow version "
                f"{ref.version} is run {ref.run_id}: the repository belongs to another registry; use another --workspace"
            )
        if keep_existing or _same_format(meta, target_name, settings.raw_inputs):
            log.info("version %d of %s is already in the repository", ref.version, model_name)
            return ExportResult(model_name, ref.version, ref.aliases, final, (), None, True)
        asked = f"target {target_name}, raw_inputs {settings.raw_inputs}"
        there = f"target {meta.get('target')}, raw_inputs {bool(meta.get('raw_inputs'))}"
        if not settings.replace:
            raise VersionConflictError(
                f"{final} holds {there}, but this export asks for {asked}; nothing was written. "
                "Pass --replace to replace it, or export the other format under a new --model-name"
            )
        if ref.version in served_versions(repository, model_name):
            raise VersionConflictError(
                f"{final} ({there}) is served by {repository.model_dir(model_name) / 'config.pbtxt'}; replacing "
                f"it with {asked} would swap a loaded version's files and signature under Triton. Promote "
                "another version first, or export the other format under a new --model-name"
            )
        replacing = True
    bundle = bundle or _load_bundle(ref)
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
    inputs = [r.tensor_spec() for r in served_inputs(raw)] if raw is not None else None
    parameters = dict(online_parameters(raw, settings.on_store_unavailable)) if raw is not None else {}
    signature = ServedSignature.from_config(target.model_config(
        model_name, n_features, bundle.objective.n_outputs, settings.serving, [ref.version], parameters, inputs=inputs))
    try:
        with repository.stage_version(model_name, ref.version, replace=replacing) as staging:
            target.write_artifacts(bundle.booster, n_features, staging, raw)
            if raw is not None:
                report = _raw_parity(bundle, target.raw_scorer(staging), settings.tolerance)
            elif (scorer := target.scorer(staging)) is not None:
                rows = gate_rows(bundle.booster, bundle.fitted.matrix(bundle.holdout), categorical=categorical)
                report = check_parity(bundle.booster, scorer, rows, tolerance=settings.tolerance,
                                      threshold=bundle.objective.threshold)
            if report is not None:
                write_json(staging / PARITY_FILE, report.to_dict())
                require(report, f"{target_name} export of {model_name} version {ref.version}")
            if bundle.objective.kind == "binary":  # what `treeops monitor` compares the served traffic with
                x = bundle.fitted.matrix(bundle.holdout)
                write_reference(staging, bundle.fitted.spec.names, bundle.fitted.spec.categorical, x,
                                bundle.objective.encode_labels(bundle.holdout[bundle.target]),
                                reference_scores(bundle.booster, x)[:, -1], bundle.objective.threshold)
            write_json(staging / FEATURES_FILE, bundle.features)
            write_json(staging / METADATA_FILE, {
                "model_name": model_name,
                "version": ref.version,
                "run_id": ref.run_id,
                "target": target_name,
                "n_features": n_features,
                "n_outputs": bundle.objective.n_outputs,
                "input_name": target.input_name,
                "raw_inputs": raw is not None,
                "inputs": [dataclasses.asdict(t) for t in inputs] if inputs else None,
                "parameters": parameters,  # config parameters this version needs (the online store's)
                "output_name": target.output_name,
                "objective": bundle.objective.to_dict(),
                "aliases_at_export": list(ref.aliases),
                "feature_spec_hash": bundle.features.get("spec_hash"),
                "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "signature": signature.to_dict(),  # what clients of this version send and get back
                MANIFEST_KEY: file_manifest(staging),  # checked by the backends before they load anything
            })
    except WrittenByAnotherRun:
        meta = repository.metadata(model_name, ref.version)
        if meta.get("run_id") != ref.run_id or not _same_format(meta, target_name, settings.raw_inputs):
            raise VersionConflictError(
                f"{final} was written by another run meanwhile, with target {meta.get('target')} and raw_inputs "
                f"{bool(meta.get('raw_inputs'))}; this run (target {target_name}, raw_inputs "
                f"{settings.raw_inputs}) wrote nothing. Pass --replace to replace it"
            ) from None
        log.info("version %d of %s was written by another run meanwhile; kept it", ref.version, model_name)
        return ExportResult(model_name, ref.version, ref.aliases, final, (), None, True, written_by_another_run=True)
    if report is not None:
        _log_parity(ref.run_id, report)
    return ExportResult(model_name, ref.version, ref.aliases, final, (), report, False, replaced=replacing)


def _load_bundle(ref: registry.ModelVersionRef) -> registry.ModelBundle:
    with tempfile.TemporaryDirectory(prefix="treeops-export-") as scratch:
        return registry.load_bundle(ref, Path(scratch))


def _same_format(meta: Mapping[str, object], target_name: str, raw_inputs: bool) -> bool:
    """Whether an exported version's metadata has this export's target and raw_inputs."""
    return meta.get("target") == target_name and bool(meta.get("raw_inputs")) == raw_inputs


def served_versions(repository: ModelRepository, model_name: str) -> tuple[int, ...]:
    """The versions `<model>/config.pbtxt` serves (first: the champion); empty without a config."""
    cfg = served_config(repository, model_name)
    return tuple(cfg.version_policy.specific.versions) if cfg is not None else ()


def served_config(repository: ModelRepository, model_name: str) -> mc.ModelConfig | None:
    """The parsed `<model>/config.pbtxt`, or None when the model has none."""
    text = repository.read_config(model_name)
    return parse(text, source=str(repository.model_dir(model_name) / CONFIG_FILE)) if text else None


def version_signature(repository: ModelRepository, model_name: str, version: int) -> ServedSignature:
    """The signature an exported version serves, as its `treeops.json` records it."""
    meta = repository.metadata(model_name, version)
    if "signature" not in meta:
        raise RepositoryError(f"{repository.version_dir(model_name, version) / METADATA_FILE} records no signature "
                              f"(exported by an older treeops); re-export version {version} with --replace")
    return ServedSignature.from_dict(meta["signature"])


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
    parameters = {**meta.get("parameters", {}), **{f"{alias}_version": str(v) for alias, v in sorted(aliases.items())}}
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
    settings: ExportSettings | None = None,
) -> ExportResult:
    """`export_version`, then serve the champion (or this version while there is no exported champion)."""
    settings = settings or ExportSettings()
    result = export_version(model_name, repository, alias=alias, version=version, settings=settings)
    aliases = registry.aliases(model_name)
    champion = aliases.get("champion")
    served = [champion] if champion in repository.versions(model_name) else [result.version]
    write_served_config(model_name, repository, served, aliases, settings.serving)
    return dataclasses.replace(result, served_versions=tuple(served))


def _raw_parity(bundle: registry.ModelBundle, scorer, tolerance: float) -> ParityReport:
    """Raw-input graph on the held-out raw rows vs Polars features + xgboost on the same rows (history
    features, which the online model reads from the store, fed as the spec computes them offline)."""
    raw = bundle.raw_holdout
    if raw.height == 0:
        raise ExportError(f"{bundle.ref.name} version {bundle.ref.version} has no raw held-out rows (it was trained on "
                          "ready features, e.g. retrained from a feature-tensor log), so --raw-inputs has nothing to "
                          "prove the raw graph on: export it without --raw-inputs, or retrain it from raw data")
    served = scorer(raw_feeds(bundle.fitted, raw))
    return check_parity(bundle.booster, lambda _features: served, bundle.fitted.matrix_raw(raw),
                        tolerance=tolerance, threshold=bundle.objective.threshold)


def _log_parity(run_id: str, report: ParityReport) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().log_dict(run_id, report.to_dict(), f"export/{PARITY_FILE}")
