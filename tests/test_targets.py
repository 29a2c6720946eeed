"""Export targets: written files score like xgboost, configs match the artifacts, Triton accepts the configs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import xgboost as xgb
from tritonclient.grpc import model_config_pb2 as mc

from export.errors import UnsupportedModelError
from export.parity import check_parity, gate_rows
from export.repository import ModelRepository
from export.targets import TARGETS, get_target
from export.booster import legacy_xgboost_json
from export.targets.fil import MODEL_FILE
from export.triton_config import ServingSettings, parse, render
from server.admin import AdminClient
from triton_fixtures import serving

N_FEATURES = 6
OBJECTIVES = {"binary:logistic": 2, "multi:softprob": 4, "multi:softmax": 3, "reg:squarederror": 1}


def _booster(objective: str, rounds: int = 15) -> xgb.Booster:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1200, N_FEATURES)).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = np.nan
    a = np.nan_to_num(x[:, 0])
    classes = OBJECTIVES.get(objective, 2)
    if objective.startswith("multi"):
        y, extra = np.digitize(a, np.quantile(a, np.linspace(0, 1, classes + 1)[1:-1])), {"num_class": classes}
    elif objective.startswith("reg") and objective != "reg:logistic":
        y, extra = 200 + 30 * a + rng.normal(size=len(a)), {}
    else:
        y, extra = (a + rng.normal(scale=0.5, size=len(a)) > 0).astype(int), {}
    return xgb.train({"objective": objective, "max_depth": 4, "seed": 0, **extra},
                     xgb.DMatrix(x, label=y, feature_names=[f"c{i}" for i in range(N_FEATURES)]), rounds)


@pytest.fixture(scope="module", params=sorted(OBJECTIVES))
def booster(request) -> xgb.Booster:
    return _booster(request.param)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_written_artifacts_pass_the_gate_and_match_the_config(name, booster, tmp_path):
    target = get_target(name)
    width = target.n_outputs(booster)
    assert width == OBJECTIVES[json.loads(booster.save_config())["learner"]["objective"]["name"]]
    target.write_artifacts(booster, N_FEATURES, tmp_path)
    holdout = np.random.default_rng(2).normal(size=(300, N_FEATURES)).astype(np.float32)
    report = check_parity(booster, target.scorer(tmp_path), gate_rows(booster, holdout))
    assert report.passed, report
    cfg = parse(render(target.model_config("m", N_FEATURES, width, ServingSettings(), [1], {"champion_version": "1"})))
    assert [(t.name, list(t.dims)) for t in cfg.input] == [(target.input_name, [N_FEATURES])]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [(target.output_name, [width])]
    assert cfg.parameters["champion_version"].string_value == "1"
    if (tmp_path / "model.onnx").exists():  # the graph declares exactly what the config serves
        graph = onnx.shape_inference.infer_shapes(onnx.load(tmp_path / "model.onnx"), strict_mode=True).graph
        dims = lambda v: [d.dim_value or -1 for d in v.type.tensor_type.shape.dim]  # noqa: E731
        assert [(v.name, dims(v)) for v in graph.input] == [(target.input_name, [-1, N_FEATURES])]
        assert [(v.name, dims(v)) for v in graph.output] == [(target.output_name, [-1, width])]


def test_native_backend_configs():
    ort_cfg = get_target("onnxruntime").model_config("m", 4, 2, ServingSettings(), [1], {})
    assert (ort_cfg.platform, ort_cfg.backend, ort_cfg.default_model_filename) == (
        "onnxruntime_onnx", "onnxruntime", "model.onnx")
    assert ort_cfg.parameters["intra_op_thread_count"].string_value == "1"
    fil = get_target("fil")
    cls = fil.model_config("m", 4, 2, ServingSettings(), [1], {})
    params = {k: v.string_value for k, v in cls.parameters.items()}
    assert cls.backend == "fil" and params == {"model_type": "xgboost_json", "output_class": "true",
                                                "predict_proba": "true", "storage_type": "AUTO", "threshold": "0.5"}
    assert [g.kind for g in cls.instance_group] == [mc.ModelInstanceGroup.KIND_AUTO]
    reg = fil.model_config("m", 4, 1, ServingSettings(instance_kind="gpu"), [1], {})
    assert reg.parameters["output_class"].string_value == "false"
    assert reg.parameters["predict_proba"].string_value == "false"
    assert [g.kind for g in reg.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("objective", ["reg:logistic", "binary:logitraw"])
def test_objectives_served_wrong_are_refused_by_every_target(name, objective, tmp_path):
    with pytest.raises(UnsupportedModelError, match=objective):
        get_target(name).write_artifacts(_booster(objective, rounds=2), N_FEATURES, tmp_path)


def test_fil_file_is_read_by_treelite_of_triton_24_10_like_xgboost(tmp_path):
    """Treelite 4.3 (FIL's reader in Triton 24.10) rejects XGBoost 3.x JSON but reads ours and agrees."""
    treelite = pytest.importorskip("treelite", reason="install treelite==4.3.0 to check the FIL file format")
    if treelite.__version__ != "4.3.0":
        pytest.skip(f"treelite {treelite.__version__} installed; this check needs 4.3.0 (Triton 24.10's FIL)")
    for objective in OBJECTIVES:
        booster = _booster(objective)
        native = tmp_path / f"native-{objective.replace(':', '_')}.json"
        booster.save_model(native)
        with pytest.raises(treelite.TreeliteError):
            treelite.frontend.load_xgboost_model(str(native))
        folder = tmp_path / objective.replace(":", "_")
        folder.mkdir()
        get_target("fil").write_artifacts(booster, N_FEATURES, folder)
        model = treelite.frontend.load_xgboost_model(str(folder / MODEL_FILE))
        x = gate_rows(booster, np.random.default_rng(4).normal(size=(200, N_FEATURES)), n_property=1000)
        fil_like = treelite.gtil.predict(model, x).reshape(len(x), -1)
        report = check_parity(booster, lambda a, p=fil_like: p, x)
        assert report.passed, (objective, report)


def test_fil_refuses_what_triton_24_10_cannot_read():
    x = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    dart = xgb.train({"objective": "binary:logistic", "booster": "dart"}, xgb.DMatrix(x, label=x[:, 0] > 0), 2)
    with pytest.raises(UnsupportedModelError, match="gbtree"):
        legacy_xgboost_json(dart)


@pytest.mark.triton
def test_real_triton_accepts_the_native_configs_up_to_the_missing_backend(trained, tmp_path):
    """The wheel's Triton has no onnxruntime/fil backend: those models are UNAVAILABLE, fraud keeps serving."""
    root = tmp_path / "repo"
    shutil.copytree(trained.ws.model_repository, root)
    repo = ModelRepository(root)
    booster = _booster("binary:logistic")
    for name in ("onnxruntime", "fil"):
        target = get_target(name)
        with repo.stage_version(f"m_{name}", 1) as staging:
            target.write_artifacts(booster, N_FEATURES, staging)
        repo.write_config(target.model_config(f"m_{name}", N_FEATURES, 2, ServingSettings(), [1], {}))
    with serving(trained.ws, tmp_path / "triton.log", repository=root, strict_readiness=False,
                 exit_on_error=False) as server:
        with AdminClient.from_settings(server.settings) as admin:  # the repository index is an admin API
            index = {m.name: m for m in admin.repository_index()}
        client = grpcclient.InferenceServerClient(server.settings.grpc_url)
        for name, backend in (("m_onnxruntime", "onnxruntime"), ("m_fil", "fil")):
            assert index[name].state == "UNAVAILABLE", index[name]
            assert f"unable to find backend library for backend '{backend}'" in index[name].reason, index[name]
        n_inputs = client.get_model_config("fraud").config.input[0].dims[0]
        features = grpcclient.InferInput("features", [1, n_inputs], "FP32")
        features.set_data_from_numpy(np.zeros((1, n_inputs), dtype=np.float32))
        scores = client.infer("fraud", [features]).as_numpy("probabilities")
        assert scores.shape == (1, 2) and abs(float(scores.sum()) - 1) < 1e-5
