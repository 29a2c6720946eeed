"""A real Triton serves the exported champion over gRPC and HTTP, scoring exactly like xgboost."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.http as httpclient
import xgboost as xgb

from server.client import ScoringClient, load_features, score_raw
from server.errors import ScoringError
from server.requests import read_signature
from training.ingest import load_raw
from training.features import RAW_SCHEMA

pytestmark = [pytest.mark.triton]


@pytest.fixture(scope="module")
def champion(trained):
    import mlflow

    booster = mlflow.xgboost.load_model("models:/fraud@champion")
    features = load_features(trained.repository.version_dir("fraud", trained.outcome.registered.version))
    raw = load_raw(trained.data, RAW_SCHEMA).collect().tail(500)
    return booster, features, raw


def _expected(booster: xgb.Booster, x: np.ndarray) -> np.ndarray:
    return booster.inplace_predict(x)


def test_grpc_scores_match_xgboost(triton, trained, champion):
    booster, features, raw = champion
    with ScoringClient(triton.settings.grpc_url) as client:
        scores = score_raw(client, features, raw)
    x = features.matrix_raw(raw)
    np.testing.assert_allclose(scores.positive, _expected(booster, x), atol=1e-5)
    assert scores.model_version == str(trained.outcome.registered.version)


def test_http_scores_match_xgboost(triton, champion):
    booster, features, raw = champion
    x = features.matrix_raw(raw.head(64))
    signature = read_signature(triton.settings.http_url, "fraud", "http")  # the HTTP model metadata
    client = httpclient.InferenceServerClient(triton.settings.http_url)
    inp = httpclient.InferInput(signature.feature_tensor.name, list(x.shape), signature.feature_tensor.datatype)
    inp.set_data_from_numpy(x, binary_data=False)
    result = client.infer("fraud", [inp])
    np.testing.assert_allclose(result.as_numpy(signature.output.name)[:, 1], _expected(booster, x), atol=1e-5)


def test_missing_values_and_single_rows(triton, champion):
    booster, _, _ = champion
    x = np.full((1, booster.num_features()), np.nan, dtype=np.float32)
    with ScoringClient(triton.settings.grpc_url) as client:
        got = client.score(x).positive
    np.testing.assert_allclose(got, _expected(booster, x), atol=1e-5)


def test_wrong_shape_is_rejected_and_server_keeps_serving(triton, champion):
    booster, features, raw = champion
    with ScoringClient(triton.settings.grpc_url, retries=0) as client:
        with pytest.raises(ScoringError, match="features"):
            client.score(np.zeros((2, booster.num_features() + 1), dtype=np.float32))
        assert client.score(features.matrix_raw(raw.head(3))).probabilities.shape == (3, 2)


def test_unknown_model_names_the_model(triton):
    with ScoringClient(triton.settings.grpc_url, model_name="nope", retries=0) as client:
        with pytest.raises(ScoringError, match="nope"):
            client.score(np.zeros((1, 10), dtype=np.float32))


def test_scoring_dicts_of_raw_fields_equals_the_dataframe_route(triton, champion):
    _, features, raw = champion
    records = raw.head(20).to_dicts()
    with ScoringClient(triton.settings.grpc_url) as client:
        from_dicts = score_raw(client, features, records)
        from_frame = score_raw(client, features, raw.head(20))
    np.testing.assert_array_equal(from_dicts.probabilities, from_frame.probabilities)


def test_metrics_endpoint_counts_requests_and_their_durations(triton, champion):
    import urllib.request

    _, features, raw = champion

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(triton.settings.metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("nv_inference") and 'model="fraud"' in line:
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = scrape()
    with ScoringClient(triton.settings.grpc_url) as client:
        for i in range(7):
            client.score(features.matrix_raw(raw.slice(i, 1)))
    key = 'nv_inference_request_success{model="fraud",version="1"}'
    deadline = time.monotonic() + 3  # a backend may record a request's statistics just after sending its answer
    while (after := scrape())[key] - before.get(key, 0) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after[key] - before.get(key, 0) == 7
    # Mean latencies come from the duration counters (summaries are off by default: see TritonSettings).
    duration = 'nv_inference_request_duration_us{model="fraud",version="1"}'
    assert after[duration] > before.get(duration, 0)
