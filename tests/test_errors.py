"""One error base: each condition has one exit code in every area; library errors become one line naming the file."""

from __future__ import annotations

import numpy as np
import polars as pl
import pydantic
import pytest
import xgboost as xgb

from bench.errors import SettingsError as BenchSettingsError
from export.errors import ModelFileError, xgboost_reason
from export.errors import SettingsError as ExportSettingsError
from export.targets import get_target
from export.targets.fil import MODEL_FILE, FilTarget
from export.triton_config import ServingSettings
from loadtest.errors import LocustRunError, SLOBreachError, SLOError
from loadtest.errors import SettingsError as LoadtestSettingsError
from loadtest.slo import SLO, find_slo_file
from monitoring.errors import DriftDetectedError, DriftInputError
from server.errors import InsecureAdminError, PortInUseError
from server.settings import TritonSettings
from training.contract import fraud_contract, validate
from training.errors import ContractViolationError, DataError
from training.errors import SettingsError as TrainingSettingsError
from training.generate import GenerateSpec, generate_transactions
from training.pipeline import choose_spec_for_schema
from treeops.errors import EXIT_CONTRACT, EXIT_DRIFT, EXIT_ERROR, EXIT_USAGE, TreeopsError


def _violation() -> ContractViolationError:
    frame = generate_transactions(GenerateSpec(rows=200, seed=1)).drop("country")
    return ContractViolationError(validate(frame.lazy(), fraud_contract(), "t.parquet"))


@pytest.mark.parametrize(("error", "code"), [
    (DataError("x"), EXIT_ERROR), (PortInUseError("x"), EXIT_ERROR), (LocustRunError("x"), EXIT_ERROR),
    (SLOBreachError("x"), EXIT_ERROR), (DriftInputError("x"), EXIT_ERROR),
    (TrainingSettingsError("x"), EXIT_USAGE), (ExportSettingsError("x"), EXIT_USAGE),
    (LoadtestSettingsError("x"), EXIT_USAGE), (SLOError("x"), EXIT_USAGE), (BenchSettingsError("x"), EXIT_USAGE),
    (InsecureAdminError("x"), EXIT_USAGE), (DriftDetectedError("x"), EXIT_DRIFT), (_violation(), EXIT_CONTRACT),
])
def test_every_area_error_is_a_treeops_error_with_its_conditions_code(error, code):
    assert isinstance(error, TreeopsError)
    assert error.exit_code == code
    assert error.to_dict()["exit_code"] == code and error.to_dict()["kind"] == type(error).__name__


def test_contract_violation_json_object_carries_the_report():
    body = _violation().to_dict()
    assert body["exit_code"] == EXIT_CONTRACT and "t.parquet FAILED contract" in body["error"]
    assert ("country", "present") in {(v["column"], v["rule"]) for v in body["violations"]}


def test_details_never_override_the_error_fields():
    body = DataError("bad").with_details({"error": "other", "exit_code": 0, "rows": 3}).to_dict()
    assert body == {"error": "bad", "kind": "DataError", "exit_code": EXIT_ERROR, "rows": 3}


def test_unknown_export_target_is_an_invalid_setting():
    with pytest.raises(ExportSettingsError, match="unknown export target 'tensorrt'; choose one of"):
        get_target("tensorrt")


def test_unknown_feature_spec_is_an_invalid_setting():
    schema = {"amount": pl.Float64, "label": pl.Int64}
    with pytest.raises(TrainingSettingsError, match="unknown feature spec 'nope'; choose auto"):
        choose_spec_for_schema(schema, "label", "nope", "data.csv")


def test_serving_settings_refuse_an_unknown_instance_kind_and_field(monkeypatch):
    with pytest.raises(pydantic.ValidationError, match="instance_kind"):
        ServingSettings(instance_kind="tpu")
    with pytest.raises(pydantic.ValidationError, match="instance_counts"):
        ServingSettings(instance_counts=1)
    monkeypatch.setenv("TREEOPS_SERVING_INSTANCE_COUNT", "1")
    assert ServingSettings().instance_count == 1 and ServingSettings(instance_count=3).instance_count == 3


def test_triton_settings_refuse_the_same_port_twice():
    with pytest.raises(pydantic.ValidationError, match="ports must differ .grpc_port 9000, http_port 9000"):
        TritonSettings(grpc_port=9000, http_port=9000)


def test_xgboost_errors_become_one_line_naming_the_file(tmp_path):
    booster = xgb.train({}, xgb.DMatrix(np.random.default_rng(0).random((50, 3)), label=np.arange(50.0)), 2)
    target = FilTarget()
    booster.save_model(tmp_path / MODEL_FILE)
    text = (tmp_path / MODEL_FILE).read_text()
    (tmp_path / MODEL_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ModelFileError) as caught:
        target.scorer(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / MODEL_FILE} is not a readable XGBoost model (")
    assert message.endswith("); export the version again")
    assert "\n" not in message and "Stack trace" not in message and "[bt]" not in message


def test_xgboost_reason_drops_time_source_and_stack():
    raw = ("[22:40:48] /__w/xgboost/xgboost/src/data/data.cc:568: Check failed: valid: Label contains NaN.\n"
           "Stack trace:\n  [bt] (0) libxgboost.so(+0x2c1a8c)")
    assert xgboost_reason(xgb.core.XGBoostError(raw)) == "valid: Label contains NaN."


def test_slo_path_of_the_repository_works_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given in ("loadtest/slo-ci.toml", "slo-ci.toml"):
        assert SLO.from_file(given).p99_ms is not None
    (tmp_path / "loadtest").mkdir()
    (tmp_path / "loadtest" / "slo-ci.toml").write_text("p99_ms = 7\n")
    assert SLO.from_file("loadtest/slo-ci.toml").p99_ms == 7  # the current folder comes first


def test_missing_slo_file_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SLOError) as caught:
        find_slo_file("budgets/tight.toml")
    message = str(caught.value)
    assert message.startswith("SLO file budgets/tight.toml does not exist; looked in ")
    assert str(tmp_path / "budgets" / "tight.toml") in message and "loadtest/tight.toml" in message
