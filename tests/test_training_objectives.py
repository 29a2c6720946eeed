"""Bring-your-own data: each objective on generated and on real bundled datasets; reproducible; bad input."""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import polars as pl
import pytest
from sklearn import datasets

from training.errors import DataError
from training.features import FRAUD_FEATURES
from training.generate import GenerateSpec, generate_transactions
from training.pipeline import choose_spec, train_and_register
from training.train import TrainParams, train_model
from treeops.workspace import Workspace


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def _frame(loader, label_names: bool = False) -> pl.DataFrame:
    bunch = loader(as_frame=True)
    frame = pl.from_pandas(bunch.frame)
    if label_names:
        names = list(bunch.target_names)
        frame = frame.with_columns(pl.col("target").map_elements(lambda i: names[i], return_dtype=pl.String))
    return frame.sample(fraction=1.0, shuffle=True, seed=0)  # bundled files are sorted by class


def _train(ws: Workspace, path, target: str, **kw):
    return train_and_register(path, target, "byo", params=TrainParams(num_boost_round=40, **kw),
                              tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)


@pytest.mark.long  # the generated-transactions test covers every objective in CI
def test_breast_cancer_binary_with_spaces_in_column_names(tmp_path):
    frame = _frame(datasets.load_breast_cancer)
    assert "mean radius" in frame.columns
    frame.write_csv(tmp_path / "cancer.csv")
    out = _train(Workspace(tmp_path), tmp_path / "cancer.csv", "target")
    assert out.metrics["roc_auc"] > 0.95
    assert out.registered.alias == "champion"


@pytest.mark.long  # the generated-transactions test covers every objective in CI
def test_iris_multiclass_with_string_labels(tmp_path):
    _frame(datasets.load_iris, label_names=True).write_parquet(tmp_path / "iris.parquet")
    ws = Workspace(tmp_path)
    out = _train(ws, tmp_path / "iris.parquet", "target")
    assert out.metrics["accuracy"] > 0.8 and "log_loss" in out.metrics
    doc = json.loads((next(ws.mlflow_artifacts.rglob("feature_spec.json"))).read_text())
    assert doc["objective"] == {"kind": "multiclass", "classes": ["setosa", "versicolor", "virginica"], "threshold": 0.5}


@pytest.mark.long  # the generated-transactions test covers every objective in CI
def test_diabetes_regression(tmp_path):
    _frame(datasets.load_diabetes).write_parquet(tmp_path / "diabetes.parquet")
    out = _train(Workspace(tmp_path), tmp_path / "diabetes.parquet", "target")
    assert {"rmse", "mae", "r2"} <= set(out.metrics)
    assert out.metrics["r2"] > 0.2


def test_generated_transactions_each_objective(tmp_path):
    raw = generate_transactions(GenerateSpec(rows=5_000, seed=9)).with_columns(
        spend_band=pl.col("amount").cut([20, 80], labels=["low", "mid", "high"]).cast(pl.String),
    )
    lf = raw.lazy()
    binary = train_model(lf, FRAUD_FEATURES, "is_fraud", TrainParams(num_boost_round=20))
    assert binary.objective.kind == "binary" and binary.booster.num_features() == len(FRAUD_FEATURES.names)
    multi = train_model(lf, FRAUD_FEATURES, "spend_band", TrainParams(num_boost_round=20))
    assert multi.objective.classes == ("high", "low", "mid") and multi.metrics["accuracy"] > 0.9
    reg = train_model(lf, FRAUD_FEATURES, "amount", TrainParams(num_boost_round=20, objective="regression"))
    assert reg.metrics["r2"] > 0.8  # log_amount is a feature


def test_unseen_category_at_scoring_is_missing_not_a_crash(tmp_path):
    frame = pl.DataFrame({"colour": ["red", "blue"] * 100, "size": np.arange(200.0), "y": [0, 1] * 100})
    spec = choose_spec_from(frame, tmp_path, "y")
    fitted = spec.fit(spec.compute(frame.lazy()))
    x = fitted.matrix_raw(pl.DataFrame({"colour": ["purple"], "size": [3.0]}))
    assert np.isnan(x[0, 0]) and x[0, 1] == 3.0


def choose_spec_from(frame: pl.DataFrame, tmp_path, target: str):
    frame.write_parquet(tmp_path / "t.parquet")
    return choose_spec(tmp_path / "t.parquet", target)


def test_same_data_and_seed_give_an_identical_model(tmp_path):
    lf = generate_transactions(GenerateSpec(rows=5_000, seed=2)).lazy()
    a = train_model(lf, FRAUD_FEATURES, "is_fraud", TrainParams(num_boost_round=30, seed=3))
    b = train_model(lf, FRAUD_FEATURES, "is_fraud", TrainParams(num_boost_round=30, seed=3))
    assert bytes(a.booster.save_raw("json")) == bytes(b.booster.save_raw("json"))


@pytest.mark.parametrize(
    ("frame", "target", "message"),
    [
        (pl.DataFrame({"x": [1.0, 2.0] * 60, "y": [0, 1] * 60}), "label", "target column 'label' is not in"),
        (pl.DataFrame({"x": [1.0, 2.0] * 60, "y": [1] * 120}), "y", "only one class"),
        (pl.DataFrame({"x": [None] * 120, "z": [1.0] * 120, "y": [0, 1] * 60}, schema={"x": pl.Float64, "z": pl.Float64, "y": pl.Int64}),
         "y", "feature(s) ['x'] are missing in every training row"),
        # A bring-your-own target with NaN / inf / null: a data error naming the column and the rows (1-based,
        # file order), not xgboost's "Label contains NaN" traceback.
        (pl.DataFrame({"x": [float(i) for i in range(120)],
                       "y": [float("nan") if i in (3, 7) else float(i % 3) / 2 for i in range(120)]}),
         "y", "target column 'y' of {path} has 2 missing, NaN or infinite value(s) (rows 4, 8)"),
        (pl.DataFrame({"x": [float(i) for i in range(120)],
                       "y": [float("inf") if i == 0 else None if i == 119 else float(i % 2) for i in range(120)]}),
         "y", "target column 'y' of {path} has 2 missing, NaN or infinite value(s) (rows 1, 120)"),
    ],
)
def test_bad_training_input_registers_nothing(tmp_path, frame, target, message):
    frame.write_parquet(tmp_path / "bad.parquet")
    ws = Workspace(tmp_path)
    with pytest.raises(DataError, match=re.escape(message.format(path=tmp_path / "bad.parquet"))):
        _train(ws, tmp_path / "bad.parquet", target)
    assert not (tmp_path / "mlflow.db").exists()


def test_unreadable_s3_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: fails fast, no traffic out
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with pytest.raises(DataError, match="cannot read s3://treeops-missing/data.parquet"):
        choose_spec("s3://treeops-missing/data.parquet", "y")
