"""Load tests: Locust drives the real Triton over gRPC and HTTP; SLOs and settings are checked strictly."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from export.signature import ServedSignature, Tensor
from loadtest.errors import LocustRunError, RowsFileError, SLOError
from loadtest.rows import load_rows, write_sample_rows
from loadtest.runner import LoadtestSettings, read_stats, render_verdict, run_loadtest
from loadtest.slo import SLO, RequestStats
from server.errors import ScoringError
from server.launcher import free_port
from server.requests import read_signature

MODEL = "fraud"
#: A 3-feature tensor model, for runs whose requests never reach (or never fit) a served model.
THREE_FEATURES = ServedSignature((Tensor("features", "FP32", (3,)),), (Tensor("probabilities", "FP32", (2,)),))


@pytest.fixture(scope="module")
def rows_file(triton, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 rows (some NaN) of the served model's feature tensor, as the Locust users replay them."""
    tensor = read_signature(triton.settings.grpc_url, MODEL).feature_tensor
    x = np.random.default_rng(0).normal(size=(200, *tensor.dims))
    x[::7, 0] = np.nan
    return write_sample_rows({tensor.name: x}, tmp_path_factory.mktemp("loadtest") / "rows.npz")


def _settings(triton, rows: Path, out_dir: Path, **overrides) -> LoadtestSettings:
    s = triton.settings
    return LoadtestSettings(rows_path=rows, out_dir=out_dir, grpc_url=s.grpc_url, http_url=s.http_url, **overrides)


@pytest.mark.triton
def test_generous_slo_passes_over_grpc_and_http(triton, rows_file, tmp_path):
    slo = SLO(p50_ms=500, p99_ms=2000, max_error_rate=0.0, min_rps=10)
    result = run_loadtest(_settings(triton, rows_file, tmp_path, protocols=("grpc", "http"), users=8,
                                    duration_s=5, slo=slo))
    verdict = render_verdict(result)
    assert result.passed, verdict
    assert result.aggregate.requests > 0 and result.aggregate.failures == 0
    assert all(result.per_protocol[p].requests > 0 for p in ("grpc", "http")), verdict
    assert [c.name for c in result.checks] == ["p50_ms", "p99_ms", "max_error_rate", "min_rps"]
    assert result.stats_csv.is_file() and result.html_report.stat().st_size > 0
    assert "verdict: PASS" in verdict and "FAIL" not in verdict


@pytest.mark.triton
def test_impossible_slo_fails_naming_p50(triton, rows_file, tmp_path):
    result = run_loadtest(_settings(triton, rows_file, tmp_path, users=8, duration_s=2, slo=SLO(p50_ms=0.001)))
    verdict = render_verdict(result)
    assert result.aggregate.requests > 0 and not result.passed
    [check] = result.checks
    assert check.name == "p50_ms" and check.measured is not None and not check.passed
    assert re.search(r"^p50_ms .* FAIL$", verdict, re.M), verdict
    assert "verdict: FAIL" in verdict


@pytest.mark.triton
def test_requests_the_model_rejects_are_reported_with_their_reason(triton, rows, tmp_path):
    # Driven as a 3-feature model, every request is refused by the served model: the verdict must say why.
    result = run_loadtest(_settings(triton, rows, tmp_path, users=2, duration_s=1, signature=THREE_FEATURES))
    verdict = render_verdict(result)
    assert result.aggregate.requests > 0 and result.aggregate.failures == result.aggregate.requests
    [error] = result.errors
    assert error.occurrences == result.aggregate.failures and "INVALID_ARG" in error.error
    assert re.search(rf"^  {error.occurrences} x grpc infer: StatusCode.INVALID_ARGUMENT: .*features", verdict, re.M), verdict


def test_unreachable_server_counts_failures_with_grpc_status(rows: Path, tmp_path):
    settings = LoadtestSettings(rows_path=rows, out_dir=tmp_path, grpc_url=f"127.0.0.1:{free_port()}", users=2,
                                duration_s=1, request_timeout_s=1, signature=THREE_FEATURES)
    result = run_loadtest(settings)
    assert result.aggregate.requests > 0 and result.aggregate.failures == result.aggregate.requests
    assert [(c.name, c.passed) for c in result.checks] == [("max_error_rate", False)]
    verdict = render_verdict(result)
    assert re.search(r"^  \d+ x grpc infer: StatusCode.UNAVAILABLE", verdict, re.M), verdict
    assert "verdict: FAIL" in verdict


def test_without_a_signature_an_unreachable_server_fails_before_locust(rows: Path, tmp_path):
    url = f"127.0.0.1:{free_port()}"
    settings = LoadtestSettings(rows_path=rows, out_dir=tmp_path, grpc_url=url, request_timeout_s=1)
    with pytest.raises(ScoringError, match=f"cannot read model 'fraud''s signature from Triton at {url}"):
        run_loadtest(settings)
    assert not (tmp_path / "locust.log").exists()


def test_rows_that_do_not_fit_the_signature_fail_before_locust(tmp_path):
    rows = write_sample_rows({"features": np.zeros((4, 5))}, tmp_path / "rows.npz")
    settings = LoadtestSettings(rows_path=rows, out_dir=tmp_path, grpc_url="127.0.0.1:1", signature=THREE_FEATURES)
    with pytest.raises(RowsFileError, match=r"do not fit model 'fraud': input 'features' has shape \(4, 5\)"):
        run_loadtest(settings)


def test_overrunning_locust_is_killed_and_reported(rows: Path, tmp_path):
    settings = LoadtestSettings(rows_path=rows, out_dir=tmp_path, grpc_url=f"127.0.0.1:{free_port()}",
                                duration_s=1, grace_s=0.2, signature=THREE_FEATURES)
    with pytest.raises(LocustRunError, match=r"did not finish within 1.2s"):
        run_loadtest(settings)
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert not left, f"Locust left processes behind: {left}"


@pytest.fixture
def rows(tmp_path) -> Path:
    return write_sample_rows({"features": np.array([[1.0, np.nan, 3.0], [4.0, 5.0, 6.0]])}, tmp_path / "rows.npz")


def test_rows_round_trip_with_their_dtypes_and_text(tmp_path):
    feeds = {"amount": np.array([[1.5], [np.nan]]), "t": np.array([[1], [2]]),
             "merchant": np.array([["grocery"], ["travel"]], dtype=object)}
    back = load_rows(write_sample_rows(feeds, tmp_path / "rows.npz"))
    assert back["amount"].dtype == np.float64 and np.isnan(back["amount"][1, 0]) and back["t"].dtype == np.int64
    assert back["merchant"].tolist() == [["grocery"], ["travel"]]


@pytest.mark.parametrize("feeds", [{"features": np.zeros(3)}, {"features": np.zeros((0, 3))},
                                   {"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}])
def test_rows_must_be_non_empty_inputs_of_equal_rows(feeds, tmp_path):
    with pytest.raises(RowsFileError, match="2-D"):
        write_sample_rows(feeds, tmp_path / "rows.npz")


def test_missing_rows_file_fails_before_locust_starts(tmp_path):
    settings = LoadtestSettings(rows_path=tmp_path / "none.npz", out_dir=tmp_path, grpc_url="127.0.0.1:8001")
    with pytest.raises(RowsFileError, match="does not exist"):
        run_loadtest(settings)


@pytest.mark.parametrize("url", ["10.0.0.5:8001", "example.com:8001", "127.0.0.1"])
def test_settings_only_target_this_machine(url, tmp_path):
    with pytest.raises(ValidationError, match="127.0.0.1:<port>"):
        LoadtestSettings(rows_path=tmp_path / "r.npy", out_dir=tmp_path, grpc_url=url)


def test_settings_need_the_url_of_each_protocol(tmp_path):
    with pytest.raises(ValidationError, match="http_url"):
        LoadtestSettings(rows_path=tmp_path / "r.npy", out_dir=tmp_path, grpc_url="127.0.0.1:1", protocols=("grpc", "http"))


@pytest.mark.parametrize("name, text", [
    ("slo.toml", "p99_ms = 50\nmax_error_rate = 0.001\n"),
    ("slo.json", json.dumps({"p99_ms": 50, "max_error_rate": 0.001})),
])
def test_slo_loads_from_toml_and_json(name, text, tmp_path):
    (tmp_path / name).write_text(text)
    assert SLO.from_file(tmp_path / name) == SLO(p99_ms=50, max_error_rate=0.001)


def test_slo_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "slo.toml"
    path.write_text("p99_ms = 50\np42_ms = 3\n")
    with pytest.raises(SLOError, match=r"unknown SLO key\(s\) p42_ms .* valid keys: p50_ms, p95_ms, p99_ms, "
                                       r"max_error_rate, min_rps"):
        SLO.from_file(path)


def test_slo_missing_file_says_so(tmp_path):
    with pytest.raises(SLOError, match="does not exist"):
        SLO.from_file(tmp_path / "slo.toml")


@pytest.mark.parametrize("text, match", [
    ("", "at least one budget"),
    ("p50_ms = -1", "p50_ms: Input should be greater than 0"),
    ("p50_ms = ", "not valid TOML"),
])
def test_slo_file_problems_are_explained(text, match, tmp_path):
    path = tmp_path / "slo.toml"
    path.write_text(text)
    with pytest.raises(SLOError, match=match):
        SLO.from_file(path)


def test_slo_evaluate_compares_each_budget_in_its_direction():
    measured = RequestStats(requests=1000, failures=2, rps=900.0, p50_ms=4, p95_ms=9, p99_ms=30)
    checks = SLO(p50_ms=5, p99_ms=20, max_error_rate=0.001, min_rps=800).evaluate(measured)
    assert [(c.name, c.measured, c.passed) for c in checks] == [
        ("p50_ms", 4, True), ("p99_ms", 30, False), ("max_error_rate", 0.002, False), ("min_rps", 900.0, True),
    ]


def test_no_requests_fail_every_check(tmp_path):
    csv_path = tmp_path / "locust_stats.csv"
    csv_path.write_text(
        "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
        "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
        "99.99%,100%\n,Aggregated,0,0,0,0,0,0,0,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A\n"
    )
    aggregate, per_protocol = read_stats(csv_path, ("grpc",))
    assert aggregate.requests == 0 and aggregate.p50_ms is None and per_protocol["grpc"].requests == 0
    assert not any(c.passed for c in SLO(p50_ms=10, max_error_rate=0.0).evaluate(aggregate))
