"""Load tests: Locust drives the real Triton over gRPC and HTTP; SLOs and settings are checked strictly."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from pydantic import ValidationError

from loadtest.errors import LocustRunError, RowsFileError, SLOError
from loadtest.protocols import INPUT_NAME
from loadtest.rows import load_rows, write_sample_rows
from loadtest.runner import LoadtestSettings, read_stats, render_verdict, run_loadtest
from loadtest.slo import SLO, RequestStats
from server.launcher import free_port

MODEL = "fraud"


@pytest.fixture(scope="module")
def rows_file(triton, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 rows (some NaN) as wide as the served model's input, as the Locust users replay them."""
    with grpcclient.InferenceServerClient(triton.settings.grpc_url) as client:
        [inp] = client.get_model_metadata(MODEL).inputs
    assert inp.name == INPUT_NAME
    x = np.random.default_rng(0).normal(size=(200, inp.shape[-1]))
    x[::7, 0] = np.nan
    return write_sample_rows(x, tmp_path_factory.mktemp("loadtest") / "rows.npy")


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


def test_unreachable_server_counts_failures_with_grpc_status(rows: Path, tmp_path):
    settings = LoadtestSettings(rows_path=rows, out_dir=tmp_path, grpc_url=f"127.0.0.1:{free_port()}", users=2,
                                duration_s=1, request_timeout_s=1)
    result = run_loadtest(settings)
    assert result.aggregate.requests > 0 and result.aggregate.failures == result.aggregate.requests
    assert [(c.name, c.passed) for c in result.checks] == [("max_error_rate", False)]
    assert "StatusCode.UNAVAILABLE" in (tmp_path / "locust_failures.csv").read_text()
    assert "verdict: FAIL" in render_verdict(result)


def test_overrunning_locust_is_killed_and_reported(rows: Path, tmp_path):
    settings = LoadtestSettings(rows_path=rows, out_dir=tmp_path, grpc_url=f"127.0.0.1:{free_port()}",
                                duration_s=1, grace_s=0.2)
    with pytest.raises(LocustRunError, match=r"did not finish within 1.2s"):
        run_loadtest(settings)
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert not left, f"Locust left processes behind: {left}"


def test_users_send_the_served_input_tensor():
    from server.client import INPUT_NAME as SERVED_INPUT_NAME  # here, so the other tests need no feature code

    assert INPUT_NAME == SERVED_INPUT_NAME


@pytest.fixture
def rows(tmp_path) -> Path:
    return write_sample_rows(np.array([[1.0, np.nan, 3.0], [4.0, 5.0, 6.0]]), tmp_path / "rows.npy")


def test_rows_round_trip_as_float32(rows):
    x = load_rows(rows)
    assert x.dtype == np.float32 and x.shape == (2, 3) and np.isnan(x[0, 1])


@pytest.mark.parametrize("matrix", [np.zeros(3), np.zeros((0, 3))])
def test_rows_must_be_a_non_empty_matrix(matrix, tmp_path):
    with pytest.raises(RowsFileError, match="2-D"):
        write_sample_rows(matrix, tmp_path / "rows.npy")


def test_missing_rows_file_fails_before_locust_starts(tmp_path):
    settings = LoadtestSettings(rows_path=tmp_path / "none.npy", out_dir=tmp_path, grpc_url="127.0.0.1:8001")
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
