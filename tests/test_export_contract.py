"""Export never changes a version's serving contract by surprise: the signature is recorded, another
format for a version on disk is refused or replaced atomically (never silently kept)."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest

from export.pipeline import (
    RAW_INPUTS_TARGET,
    ExportSettings,
    export_model,
    export_version,
    served_config,
    version_signature,
)
from export.repository import ModelRepository, VersionConflictError
from export.signature import ServedSignature
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace

MODEL = "fraud"


@pytest.fixture(scope="module")
def two_exported(trained, tmp_path_factory):
    """A copy of the trained workspace with v2 (challenger) registered; v1 (champion) exported and served."""
    ws = Workspace(tmp_path_factory.mktemp("contract"))
    shutil.copytree(trained.ws.root, ws.root, dirs_exist_ok=True)
    train_and_register(trained.data, "is_fraud", MODEL, params=TrainParams(num_boost_round=10),
                       tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
    mlflow.set_tracking_uri(ws.tracking_uri)
    return ws, ModelRepository(ws.model_repository)


def _leftovers(repo: ModelRepository) -> list[str]:
    return sorted(p.name for p in repo.model_dir(MODEL).iterdir() if p.name.startswith("."))


def test_treeops_json_records_the_signature_the_config_serves(two_exported):
    _, repo = two_exported
    meta = repo.metadata(MODEL, 1)
    assert meta["signature"] == ServedSignature.from_config(served_config(repo, MODEL)).to_dict()
    assert version_signature(repo, MODEL, 1).feature_tensor is not None


def test_another_format_for_a_version_on_disk_is_refused_then_replaced_atomically(two_exported, treeops):
    ws, repo = two_exported
    mlflow.set_tracking_uri(ws.tracking_uri)
    export_version(MODEL, repo, version=2)
    before = (repo.version_dir(MODEL, 2) / "treeops.json").read_text()
    assert export_version(MODEL, repo, version=2).already_present  # same target and settings: kept

    refused = treeops("export", "--version", "2", "--raw-inputs", workspace=ws.root)
    assert refused.returncode == 1, refused.stderr
    assert (f"holds target native-compiled, raw_inputs False, but this export asks for target {RAW_INPUTS_TARGET}, "
            "raw_inputs True; nothing was written. Pass --replace") in refused.stderr
    assert "Traceback" not in refused.stderr and "kept" not in refused.stdout
    assert (repo.version_dir(MODEL, 2) / "treeops.json").read_text() == before

    replaced = treeops("export", "--version", "2", "--raw-inputs", "--replace", "--json", workspace=ws.root)
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout)["replaced"] is True
    meta = repo.metadata(MODEL, 2)
    assert meta["raw_inputs"] is True and meta["target"] == RAW_INPUTS_TARGET
    assert version_signature(repo, MODEL, 2).feature_tensor is None  # one input per raw field now
    assert _leftovers(repo) == []  # neither the staging folder nor the old version is left behind
    assert repo.metadata(MODEL, 1)["target"] == "native-compiled"  # the served champion is untouched


def test_replace_is_refused_for_the_version_config_serves(two_exported):
    _, repo = two_exported
    config = repo.read_config(MODEL)
    with pytest.raises(VersionConflictError, match=r"is served by .*config.pbtxt; replacing it with target "
                       rf"{RAW_INPUTS_TARGET}, raw_inputs True would swap a loaded version's files"):
        export_model(MODEL, repo, version=1, alias=None, settings=ExportSettings(raw_inputs=True, replace=True))
    assert repo.metadata(MODEL, 1)["raw_inputs"] is False and repo.read_config(MODEL) == config


def test_export_settings_refuse_unknown_fields():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="raw_input"):
        ExportSettings(raw_input=True)
