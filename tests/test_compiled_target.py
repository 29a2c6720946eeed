"""The compiled targets (tl2cgen forest in model.py, or in treeops' native C backend) on the real Triton."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager

import mlflow
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import xgboost as xgb
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from export.errors import UnsupportedModelError
from export.manifest import MANIFEST_KEY, file_manifest
from export.native_backend import BACKEND_LIBRARY, build_backend
from export.pipeline import ExportSettings, export_model, write_served_config
from export.repository import METADATA_FILE, ModelRepository, write_json
from export.targets import get_target
from export.triton_config import ServingSettings
from server.admin import GRPC_RESTRICTED_PREFIX, AdminClient, AdminError, RepositoryModel
from server.client import ScoringClient, load_features
from server.launcher import TritonServer, TritonStartError
from training.generate import GenerateSpec, generate_transactions
from triton_fixtures import serving

pytest.importorskip("tl2cgen", reason="the compiled runtime needs tl2cgen (pinned in the test extras)")
pytestmark = [pytest.mark.triton, pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler (gcc)")]


def _export(trained, root, target: str):
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    try:
        repo = ModelRepository(root)
        result = export_model("fraud", repo, settings=ExportSettings(target=target))
        booster = mlflow.xgboost.load_model("models:/fraud@champion")
    finally:
        mlflow.set_tracking_uri(before)
    assert result.parity is not None and result.parity.passed
    return repo, result, booster


def _server(root, tmp_path, trained) -> AbstractContextManager[TritonServer]:
    """Triton serving `root` once the server is ready (each test waits for the models it needs)."""
    return serving(trained.ws, tmp_path / "triton.log", repository=root, models=(), exit_timeout_s=5,
                   strict_readiness=False)


@pytest.mark.parametrize("target", ["python-compiled", "native-compiled"])
def test_compiled_version_passes_the_gate_and_serves_like_xgboost(target, trained, tmp_path):
    repo, result, booster = _export(trained, tmp_path / "repo", target)
    assert (result.version_dir / "forest.so").exists()
    if target == "native-compiled":
        assert (result.version_dir / BACKEND_LIBRARY).exists() and 'backend: "treeops_forest"' in repo.read_config("fraud")
    else:
        assert '"compiled"' in repo.read_config("fraud")
    features = load_features(result.version_dir)
    x = features.matrix_raw(generate_transactions(GenerateSpec(rows=2_000, seed=41)))
    with _server(repo.root, tmp_path, trained) as server:
        server.wait_ready(90, ["fraud"])
        with ScoringClient(server.settings.grpc_url, retries=0, max_rows_per_request=256) as client:
            served = client.score(x).positive
            single = client.score(x[:1]).positive
    np.testing.assert_allclose(served, booster.inplace_predict(x), atol=1e-5)
    assert single[0] == served[0]  # a row's score does not depend on its batch


def test_native_backend_rejects_bad_requests_and_keeps_serving(trained, tmp_path):
    """Wrong dtype, width or an empty batch get an error naming the input; good requests before and after are right."""
    repo, _, booster = _export(trained, tmp_path / "repo", "native-compiled")
    n = booster.num_features()
    x = np.random.default_rng(5).normal(size=(3, n)).astype(np.float32)
    with _server(repo.root, tmp_path, trained) as server:
        server.wait_ready(90, ["fraud"])
        client = grpcclient.InferenceServerClient(server.settings.grpc_url)

        def infer(array: np.ndarray, dtype: str = "FP32"):
            tensor = grpcclient.InferInput("features", list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            return client.infer("fraud", [tensor]).as_numpy("probabilities")

        good = infer(x)
        np.testing.assert_allclose(good[:, 1], booster.inplace_predict(x), atol=1e-5)
        for bad, dtype in ((x.astype(np.float64), "FP64"), (x[:, :-1].copy(), "FP32"), (np.zeros((0, n), np.float32), "FP32")):
            with pytest.raises(InferenceServerException, match="input 'features'"):
                infer(bad, dtype)
        np.testing.assert_array_equal(infer(x), good)
        assert client.is_server_live() and client.is_model_ready("fraud")
        stats = client.get_inference_statistics("fraud", headers=_admin_headers(server)).model_stats[0]
        assert stats.inference_stats.success.count >= 2  # the backend reports its statistics


def test_native_version_without_its_forest_fails_to_load_with_the_reason(trained, tmp_path):
    repo, result, _ = _export(trained, tmp_path / "repo", "native-compiled")
    (result.version_dir / "forest.so").unlink()
    with _server(repo.root, tmp_path, trained) as server:
        client = grpcclient.InferenceServerClient(server.settings.grpc_url)
        (entry,) = _index(server, "fraud").values()
        assert entry.state == "UNAVAILABLE" and "forest.so" in entry.reason, entry
        assert client.is_server_live()


def test_native_target_refuses_gpu_instances_and_raw_inputs():
    target = get_target("native-compiled")
    with pytest.raises(UnsupportedModelError, match="CPU"):
        target.model_config("m", 4, 2, ServingSettings(instance_kind="gpu"), [1], {})
    with pytest.raises(UnsupportedModelError, match="feature tensor"):
        target.model_config("m", 4, 2, ServingSettings(), [1], {}, inputs=[])


def test_two_native_versions_loaded_together_each_score_their_own_forest(trained, tmp_path):
    """Each version's backend loads its own forest.so (same file name, other folder): no cross-talk."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    boosters = {version: xgb.train({"objective": "binary:logistic", "max_depth": 3, "seed": version},
                                   xgb.DMatrix(x, label=(x[:, version] > 0)), 10) for version in (1, 2)}
    repo, target = ModelRepository(tmp_path / "repo"), get_target("native-compiled")
    for version, booster in boosters.items():
        with repo.stage_version("twin", version) as staging:
            target.write_artifacts(booster, 5, staging)
            write_json(staging / METADATA_FILE, {"input_name": target.input_name, "output_name": target.output_name,
                                                 MANIFEST_KEY: file_manifest(staging)})
    repo.write_config(target.model_config("twin", 5, 2, ServingSettings(max_batch_size=64), [1, 2], {}))
    with _server(repo.root, tmp_path, trained) as server:
        client = grpcclient.InferenceServerClient(server.settings.grpc_url)
        for version, booster in boosters.items():
            tensor = grpcclient.InferInput("features", [64, 5], "FP32")
            tensor.set_data_from_numpy(x[:64])
            served = client.infer("twin", [tensor], model_version=str(version)).as_numpy("probabilities")[:, 1]
            np.testing.assert_allclose(served, booster.inplace_predict(x[:64]), atol=1e-6)
    assert not np.allclose(boosters[1].inplace_predict(x), boosters[2].inplace_predict(x), atol=1e-3)


def _admin_headers(server: TritonServer) -> dict[str, str]:
    """gRPC metadata that opens the admin APIs (statistics, repository) of `server`."""
    return {GRPC_RESTRICTED_PREFIX + server.settings.admin_header: server.settings.admin_key.get_secret_value()}


def _index(server: TritonServer, model: str) -> dict[str, RepositoryModel]:
    """Triton's repository index entries of `model` by version."""
    return {m.version: m for m in AdminClient.from_settings(server.settings).repository_index() if m.name == model}


@pytest.mark.parametrize("target", ["native-compiled", "python-compiled"])
def test_a_damaged_version_file_is_refused_naming_the_file_and_the_server_keeps_serving(target, trained, tmp_path):
    """Export records each file's size and SHA-256; a truncated forest.so (which crashed tritonserver with
    SIGBUS) or one changed byte is refused with the file named. Triton loads a model's versions all or
    nothing: at start the damaged model is UNAVAILABLE while the others serve; a reload that adds a damaged
    version fails and the versions already serving keep serving."""
    repo, result, booster = _export(trained, tmp_path / "repo", target)
    good = result.version
    truncated, flipped = good + 1, good + 2
    for model in ("fraud", "damaged"):
        for version in (good, truncated, flipped):
            if not repo.version_dir(model, version).exists():
                shutil.copytree(result.version_dir, repo.version_dir(model, version))
        forest = repo.version_dir(model, truncated) / "forest.so"
        forest.write_bytes(forest.read_bytes()[: forest.stat().st_size // 2])
        changed = bytearray((repo.version_dir(model, flipped) / "forest.so").read_bytes())
        changed[len(changed) // 2] ^= 0xFF
        (repo.version_dir(model, flipped) / "forest.so").write_bytes(bytes(changed))
    write_served_config("damaged", repo, [good, truncated, flipped], {}, ServingSettings(instance_count=1))
    x = np.random.default_rng(2).normal(size=(8, booster.num_features())).astype(np.float32)
    with _server(repo.root, tmp_path, trained) as server:
        client = grpcclient.InferenceServerClient(server.settings.grpc_url)

        def score() -> np.ndarray:
            tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return client.infer("fraud", [tensor], model_version=str(good)).as_numpy("probabilities")[:, 1]

        index = _index(server, "damaged")
        short, changed = index[str(truncated)], index[str(flipped)]
        assert short.state == "UNAVAILABLE" and f"damaged/{truncated}/forest.so has" in short.reason, short
        assert "bytes" in short.reason and "treeops.json" in short.reason, short
        assert changed.state == "UNAVAILABLE" and f"damaged/{flipped}/forest.so has SHA-256" in changed.reason, changed
        np.testing.assert_allclose(score(), booster.inplace_predict(x), atol=1e-5)

        write_served_config("fraud", repo, [good, truncated], {}, ServingSettings(instance_count=1))
        with pytest.raises(AdminError, match=f"fraud/{truncated}/forest.so has"):
            AdminClient.from_settings(server.settings).load_model("fraud")
        np.testing.assert_allclose(score(), booster.inplace_predict(x), atol=1e-5)  # version `good` still serves
        assert client.is_server_live() and server.is_running()


@pytest.mark.parametrize("models", [["fraud"], []], ids=["waiting-for-it", "strict-readiness"])
def test_a_start_waiting_for_a_model_that_cannot_load_fails_at_once_naming_why(models, trained, tmp_path):
    """A start raises as soon as Triton gives up on a model it waits for (named in `models`, or any model under
    strict readiness, as `treeops serve` starts), with the model's error, not at the timeout."""
    repo, result, _ = _export(trained, tmp_path / "repo", "native-compiled")
    forest = result.version_dir / "forest.so"
    forest.write_bytes(forest.read_bytes()[: forest.stat().st_size // 2])
    started = time.monotonic()
    with pytest.raises(TritonStartError, match=r"(?s)could not load 'fraud'.*fraud/1/forest.so has \d+ bytes"):
        with serving(trained.ws, tmp_path / "triton.log", repository=repo.root, models=models, exit_timeout_s=5,
                     start_timeout_s=120):
            pass
    assert time.monotonic() - started < 60, "it waited for the start timeout"


def _mapped(pid: int, path) -> bool:
    return str(path) in open(f"/proc/{pid}/maps").read()


def test_a_config_that_disagrees_with_the_forest_or_an_old_triton_api_is_refused_naming_why(trained, tmp_path):
    """ModelInitialize checks the config against the forest and the names export recorded; the Triton API
    minor is checked; what a refused load opened (forest.so) is closed again. The good model serves."""
    repo, result, booster = _export(trained, tmp_path / "repo", "native-compiled")
    n, version, target = booster.num_features(), result.version, get_target("native-compiled")

    cases = {
        "dims": (lambda c: c.input[0].dims.__setitem__(0, n - 1),
                 f"config input 'features' has dims [{n - 1}] but forest.so has {n} features"),
        "dtype": (lambda c: setattr(c.input[0], "data_type", mc.TYPE_FP64), "data_type is TYPE_FP64"),
        "input_name": (lambda c: setattr(c.input[0], "name", "x"),
                       "config input name is 'x' but the version was exported with 'features'"),
        "width": (lambda c: c.output[0].dims.__setitem__(0, 3),
                  "config output 'probabilities' has dims [3] but forest.so has 2 outputs per row"),
        "old_api": (None, "needs TRITONBACKEND API 1.999 or a later 1.x, but this tritonserver has 1."),
    }
    for name, (mutate, _) in cases.items():
        shutil.copytree(result.version_dir, repo.version_dir(name, version))
        cfg = target.model_config(name, n, 2, ServingSettings(instance_count=1, warmup=False), [version], {})
        if mutate is not None:
            mutate(cfg)
        repo.write_config(cfg)
    build_backend(repo.version_dir("old_api", version), defines={"TREEOPS_BACKEND_API_MINOR": "999"})
    with _server(repo.root, tmp_path, trained) as server:
        client = grpcclient.InferenceServerClient(server.settings.grpc_url)
        for name, (_, reason) in cases.items():
            (entry,) = _index(server, name).values()
            assert entry.state == "UNAVAILABLE" and reason in entry.reason, (name, entry)
            assert not _mapped(server.pid, repo.version_dir(name, version) / "forest.so"), name
        assert _mapped(server.pid, result.version_dir / "forest.so")  # the check can see a loaded forest
        assert client.is_model_ready("fraud") and client.is_server_live()


def test_statistics_split_a_batch_into_input_scoring_and_output_as_the_api_defines(trained, tmp_path):
    """Triton's compute_input is reading the inputs, compute_infer the scoring: with 8 requests in one
    execution, compute_input no longer counts the scoring of the requests before each one."""
    repo, result, booster = _export(trained, tmp_path / "repo", "native-compiled")
    n = booster.num_features()
    shutil.copytree(result.version_dir, repo.version_dir("batched", result.version))
    serving = ServingSettings(max_batch_size=4096, max_queue_delay_us=300_000, instance_count=1, warmup=False)
    repo.write_config(get_target("native-compiled").model_config("batched", n, 2, serving, [result.version], {}))
    x = np.random.default_rng(4).normal(size=(8, 256, n)).astype(np.float32)
    with _server(repo.root, tmp_path, trained) as server:
        server.wait_ready(90, ["batched"])

        def infer(rows: np.ndarray) -> np.ndarray:
            client = grpcclient.InferenceServerClient(server.settings.grpc_url)
            tensor = grpcclient.InferInput("features", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)
            return client.infer("batched", [tensor]).as_numpy("probabilities")

        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(infer, x))
        stats = grpcclient.InferenceServerClient(server.settings.grpc_url).get_inference_statistics(
            "batched", headers=_admin_headers(server)).model_stats[0]
    for rows, scores in zip(x, served):
        np.testing.assert_allclose(scores[:, 1], booster.inplace_predict(rows), atol=1e-5)
    s = stats.inference_stats
    assert s.success.count == 8 and stats.execution_count < 8, stats  # requests shared executions
    assert s.compute_input.ns > 0 and s.compute_infer.ns > 0 and s.compute_output.ns > 0, s
    assert s.compute_input.ns < s.compute_infer.ns / 2, s  # gathering rows is cheap next to scoring them
    assert s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns < s.success.ns, s
