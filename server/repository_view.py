"""Read-only view of what the Triton repository serves: versions, config parameters, feature specs."""

from __future__ import annotations

from pathlib import Path

from export.repository import CONFIG_FILE, ModelRepository
from export.triton_config import parse
from server.client import load_features
from server.errors import ScoringError
from training.features import FittedFeatures


def served_version(repository: Path, model_name: str) -> int:
    """The champion version named in `<model>/config.pbtxt`."""
    repo = ModelRepository(repository)
    text = repo.read_config(model_name)
    if text is None:
        raise ScoringError(
            f"model {model_name!r} is not in the repository {repository} (no {CONFIG_FILE}); "
            f"models there: {sorted(p.name for p in repository.iterdir() if p.is_dir()) if repository.is_dir() else []}; "
            "run `treeops export` first"
        )
    cfg = parse(text, source=str(repo.model_dir(model_name) / CONFIG_FILE))
    if "champion_version" in cfg.parameters:
        return int(cfg.parameters["champion_version"].string_value)
    return max(cfg.version_policy.specific.versions)


def served_features(repository: Path, model_name: str) -> tuple[int, FittedFeatures]:
    """The served version and the fitted feature spec stored with it."""
    version = served_version(repository, model_name)
    return version, load_features(ModelRepository(repository).version_dir(model_name, version))
