"""The CI latency gate: 30 s of gRPC + HTTP Locust traffic against the real Triton, held to loadtest/slo-ci.toml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SLO_FILE = Path(__file__).resolve().parents[1] / "loadtest" / "slo-ci.toml"

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_ci_slo_gate_holds(trained, triton, treeops):
    out = treeops(
        "loadtest", "--duration-s", "30", "--users", "16", "--protocol", "grpc", "--protocol", "http",
        "--slo", str(SLO_FILE), "--data", str(trained.data), "--grpc-url", triton.settings.grpc_url,
        "--http-url", triton.settings.http_url, "--json", workspace=trained.ws.root, timeout=240,
    )
    body = json.loads(out.stdout)
    verdict = {c["name"]: (c["budget"], c["measured"], c["passed"]) for c in body["checks"]}
    print(json.dumps(verdict, indent=1))  # the verdict lands in the CI log
    assert out.returncode == 0, verdict
    assert body["passed"] and body["failures"] == 0
    assert set(verdict) == {"p50_ms", "p95_ms", "p99_ms", "max_error_rate", "min_rps"}
