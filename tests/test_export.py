"""Export: configs valid against Triton's proto, the parity gate, refusals and atomic writes."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import xgboost as xgb

from registry import versions as registry
from export.errors import ExportError, ModelNotFoundError, ParityError, RepositoryError, UnsupportedModelError
from export.onnx_convert import to_onnx
from export.parity import check_parity, edge_rows, require
from export.pipeline import DEFAULT_TARGET, export_model
from export.repository import ModelRepository
from export.targets import TARGETS, get_target
from export.triton_config import ServingSettings, TensorSpec, model_config, parse, render
from training.train import TrainParams


def _booster(objective: str, n: int = 400, features: int = 5, **extra) -> xgb.Booster:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x[:, 0] + rng.normal(scale=0.5, size=n) > 0).astype(np.float32)
    return xgb.train({"objective": objective, "max_depth": 3, **extra}, xgb.DMatrix(x, label=y), num_boost_round=10)


def test_generated_config_parses_with_triton_schema():
    cfg = model_config("m", inputs=[TensorSpec("features", (10,))], outputs=[TensorSpec("probabilities", (2,))],
                       serving=ServingSettings(preferred_batch_sizes=(8, 32)), versions=[3, 1], backend="python",
                       parameters={"champion_version": "3"})
    text = render(cfg)
    back = parse(text)
    assert back.name == "m" and back.backend == "python"
    assert list(back.version_policy.specific.versions) == [1, 3]
    assert list(back.input[0].dims) == [10]
    assert back.dynamic_batching.max_queue_delay_microseconds == ServingSettings().max_queue_delay_us
    assert [w.batch_size for w in back.model_warmup] == [1, 64]


def test_parse_rejects_unknown_fields():
    with pytest.raises(RepositoryError, match="not a valid Triton model config"):
        parse('name: "m"\nmax_batch_sise: 4\n')


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_target_config_is_valid(name):
    target = get_target(name)
    cfg = target.model_config("m", 10, 2, ServingSettings(), [1], {})
    assert parse(render(cfg)).name == "m"


@pytest.mark.parametrize("objective", ["reg:logistic", "binary:logitraw"])
def test_objectives_the_converter_gets_wrong_are_refused(objective):
    with pytest.raises(UnsupportedModelError, match=objective):
        to_onnx(_booster(objective), 5)


def test_parity_gate_catches_a_wrong_scorer():
    booster = _booster("binary:logistic")
    x = np.random.default_rng(1).normal(size=(200, 5)).astype(np.float32)
    x = np.vstack([x, edge_rows(5, np.median(x, axis=0))])
    good = check_parity(booster, lambda a: booster.inplace_predict(a), x)
    assert good.passed and good.max_abs_diff == 0
    bad = check_parity(booster, lambda a: booster.inplace_predict(a) * 0.9 + 0.05, x)
    assert not bad.passed and bad.flipped_decisions == 0  # 0.9 p + 0.05 keeps every decision at 0.5: scores fail
    inverted = check_parity(booster, lambda a: np.where(booster.inplace_predict(a) >= 0.5, 0.0, 1.0), x)
    assert not inverted.passed and inverted.flipped_decisions == len(x)
    with pytest.raises(ParityError, match="nothing was written"):
        require(bad, "test artifact")


def test_onnx_matches_xgboost_with_missing_and_extreme_values():
    booster = _booster("binary:logistic")
    import onnxruntime as ort

    session = ort.InferenceSession(to_onnx(booster, 5).SerializeToString(), providers=["CPUExecutionProvider"])
    x = edge_rows(5, np.zeros(5, dtype=np.float32))
    report = check_parity(booster, lambda a: session.run(["probabilities"], {"features": a})[0], x)
    assert report.passed, report


def test_unknown_model_and_alias_list_what_exists(trained):
    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    with pytest.raises(ModelNotFoundError, match=r"no registered model 'nope'; registered models: \['fraud'\]"):
        registry.resolve("nope")
    with pytest.raises(ModelNotFoundError, match=r"no alias 'staging'; aliases: \{'champion'"):
        registry.resolve("fraud", alias="staging")
    with pytest.raises(ModelNotFoundError, match=r"no version 99; versions: \[1"):
        registry.resolve("fraud", version=99)


def test_export_writes_a_complete_version_with_metadata(trained):
    version_dir = trained.repository.version_dir("fraud", trained.outcome.registered.version)
    assert sorted(p.name for p in version_dir.iterdir()) == [  # the default target: native-compiled
        "feature_spec.json", "forest.so", "libtriton_treeops_forest.so", "parity.json", "reference.json",
        "reference.parquet", "treeops.json"]
    meta = json.loads((version_dir / "treeops.json").read_text())
    assert meta["run_id"] == trained.outcome.registered.run_id
    parity = json.loads((version_dir / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-5 and parity["rows"] > 1000
    assert not [p for p in version_dir.parent.iterdir() if p.name.startswith(".staging")]


def test_export_is_idempotent_and_refuses_a_foreign_repository(trained, tmp_path):
    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    again = export_model("fraud", trained.repository)
    assert again.already_present and again.parity is None
    foreign = ModelRepository(tmp_path / "repo")
    version = trained.outcome.registered.version
    target = foreign.version_dir("fraud", version)
    target.mkdir(parents=True)
    (target / "treeops.json").write_text(json.dumps({"run_id": "someone-else"}))
    with pytest.raises(ExportError, match="belongs to another registry"):
        export_model("fraud", foreign)


def test_failed_export_leaves_no_version_folder(trained, tmp_path, monkeypatch):
    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    repo = ModelRepository(tmp_path / "repo")
    target = get_target(DEFAULT_TARGET)
    monkeypatch.setattr(type(target), "scorer", lambda self, d: (lambda a: np.full((len(a), 2), 0.5, np.float32)))
    with pytest.raises(ParityError):
        export_model("fraud", repo)
    model_dir = repo.model_dir("fraud")
    assert repo.versions("fraud") == []
    assert not model_dir.exists() or list(model_dir.iterdir()) == []


@pytest.mark.parametrize(("loader", "objective", "outputs"), [("load_iris", "multiclass", 3), ("load_diabetes", "regression", 1)])
def test_multiclass_and_regression_versions_export_through_the_gate(tmp_path, loader, objective, outputs):
    import polars as pl
    from sklearn import datasets

    from training.pipeline import train_and_register
    from treeops.workspace import Workspace

    before = mlflow.get_tracking_uri()
    try:
        frame = pl.from_pandas(getattr(datasets, loader)(as_frame=True).frame).sample(fraction=1.0, shuffle=True, seed=1)
        frame.write_parquet(tmp_path / "d.parquet")
        ws = Workspace(tmp_path)
        train_and_register(tmp_path / "d.parquet", "target", "byo", params=TrainParams(num_boost_round=30),
                           tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
        mlflow.set_tracking_uri(ws.tracking_uri)
        repo = ModelRepository(ws.model_repository)
        result = export_model("byo", repo)
    finally:
        mlflow.set_tracking_uri(before)
    assert result.parity is not None and result.parity.passed and result.parity.rows > 1000
    meta = json.loads((result.version_dir / "treeops.json").read_text())
    assert meta["n_outputs"] == outputs and meta["objective"]["kind"] == objective
    config = parse(repo.read_config("byo"))
    assert list(config.output[0].dims) == [outputs]
