"""The serving benchmark end to end with tiny sizes against a real Triton: structure and consistency, no timings."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from export.triton_config import ServingSettings
from loadtest.bench import BenchSettings, grpc_request_headers, run_serving_benchmark
from export.parity import check_parity, gate_rows
from export.compiled_forest import compile_forest, compiled_scorer
from loadtest.bench_model import BenchModelSpec, synthetic_rows, train_bench_model
from loadtest.errors import SettingsError

TINY = BenchModelSpec(trees=8, depth=3, features=6, train_rows=500, seed=1)


def _tiny(**overrides) -> BenchSettings:
    base = dict(model=TINY, serving=ServingSettings(max_batch_size=64), sequential_requests=30, health_requests=30,
                warmup_requests=5, concurrency=(1, 4), step_s=0.4, warmup_s=0.1, batch_rows=16, batch_concurrency=2,
                floor_repeats=20)
    return BenchSettings(**{**base, **overrides})


def _no_tritonserver_left(pid_before: set[str]) -> None:
    now = set(subprocess.run(["pgrep", "-f", "treeops-bench-"], capture_output=True, text=True).stdout.split())
    assert not (now - pid_before), "the benchmark left a tritonserver (or stub) running"


@pytest.mark.triton
@pytest.mark.slow
def test_benchmark_runs_end_to_end_and_writes_consistent_json(tmp_path):
    before = set(subprocess.run(["pgrep", "-f", "treeops-bench-"], capture_output=True, text=True).stdout.split())
    out = tmp_path / "bench.json"
    result = run_serving_benchmark(_tiny(), out_path=out)
    _no_tritonserver_left(before)

    data = json.loads(out.read_text())
    assert set(data) >= {"settings", "floors", "health", "sequential", "sweep", "batch", "health_loaded", "reference",
                         "ratios", "targets", "triton_command"}
    assert [s["concurrency"] for s in data["sweep"]] == [1, 4]
    assert data["settings"]["runtime"] == "native"  # the default: treeops' C backend
    assert {(f["runtime"], f["rows"]) for f in data["floors"]} == {
        (runtime, rows) for runtime in ("onnxruntime", "xgboost", "compiled") for rows in (1, 16)}
    assert all(f["p50_us"] > 0 and f["rows_per_s"] > 0 for f in data["floors"])

    steps = [result.health, result.sequential, *result.sweep, result.batch, result.health_loaded, result.reference]
    for step in steps:
        assert step.requests > 0 and step.failures == 0, step
        assert 0 < step.p50_us <= step.p99_us, step
        assert step.req_per_s == pytest.approx(step.requests / step.duration_s)
        assert step.client_cpu_us_per_req > 0
    # 30 requests may fit inside one clock tick of tritonserver's CPU time; the whole run does not.
    assert sum(s.server_cpu_us_per_req * s.requests for s in steps) > 0, "no tritonserver CPU time was sampled"
    assert result.sequential.requests == 30 and result.health.requests == 30
    assert result.batch.rows_per_request == 16 and result.batch.rows_per_s == pytest.approx(16 * result.batch.req_per_s)
    assert result.health.triton is None  # ServerLive runs no model
    assert result.health.rows_per_s == 0 and result.health_loaded.concurrency == 4
    for step in [result.sequential, *result.sweep, result.batch]:
        t = step.triton
        # The client counts calls started in the window, Triton those completed in it: they differ by what was
        # in flight at the window's two ends.
        assert t is not None and abs(t.requests - step.requests) <= 2 * step.concurrency and t.executions >= 1
        assert t.compute_infer_us > 0 and t.request_us >= t.compute_infer_us
        assert 1 <= t.mean_batch_rows <= 64
    assert result.sequential.triton.mean_batch_rows == 1.0  # one call at a time never batches
    assert result.reference.client == "grpc-aio" and result.sweep[0].client == "h2"
    assert set(result.ratios) >= {"sequential_p50_over_health_p50", "batch_rows_per_s_over_onnxruntime"}
    assert all(v > 0 for v in result.ratios.values())
    assert all(isinstance(v["met"], bool) for v in result.targets.values())
    text = "\n".join(result.lines())
    assert "sequential" in text and "single c4" in text and "batch 16" in text


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["compiled", "onnxruntime"])
def test_benchmark_with_python_backend_runtimes_and_two_client_processes(runtime, tmp_path):
    settings = _tiny(runtime=runtime, client_processes=2, concurrency=(4,), reference_client=False,
                     serving=ServingSettings(max_batch_size=64, max_queue_delay_us=0, instance_count=2,
                                             dynamic_batching=False))
    result = run_serving_benchmark(settings, workdir=tmp_path / "work")
    assert result.reference is None
    assert {(f.runtime, f.rows) for f in result.floors} >= {("onnxruntime", 1), ("onnxruntime", 16)}
    assert (("compiled", 16) in {(f.runtime, f.rows) for f in result.floors}) == (runtime == "compiled")
    assert result.sweep[0].requests > 0 and result.sweep[0].failures == 0
    assert result.sweep[0].triton.mean_batch_rows == 1.0  # no dynamic batcher: one request per execution
    assert (tmp_path / "work" / "triton.log").exists()
    config = (tmp_path / "work" / "model_repository" / "bench" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "dynamic_batching" not in config
    assert ('key: "runtime"' in config) == (runtime == "compiled")


def test_compiled_forest_passes_the_parity_gate(tmp_path):
    pytest.importorskip("tl2cgen", reason="the compiled runtime needs tl2cgen==1.0.0")
    booster = train_bench_model(TINY)
    path = compile_forest(booster, TINY.features, tmp_path / "forest.so")
    x = gate_rows(booster, synthetic_rows(200, TINY.features, 4), n_property=300)
    report = check_parity(booster, compiled_scorer(path, 2), x)
    assert report.passed, report
    scores = compiled_scorer(path, 2)(x)
    np.testing.assert_array_equal(scores[:, 0], np.float32(1) - scores[:, 1])


def test_invalid_settings_list_every_problem():
    with pytest.raises(SettingsError) as err:
        BenchSettings(concurrency=(), step_s=0, client="locust")  # type: ignore[arg-type]
    message = str(err.value)
    assert "concurrency" in message and "step_s" in message and "client" in message


def test_request_headers_are_a_plain_hpack_block():
    block = grpc_request_headers("127.0.0.1:8001", "/inference.GRPCInferenceService/ModelInfer")
    assert block.startswith(b"\x83\x86\x04")  # :method POST, :scheme http, literal :path
    assert b"application/grpc" in block and b"trailers" in block


def test_scorer_survives_its_file_being_rewritten_in_place(tmp_path):
    """The parity gate's scorer loads a private copy: rewriting the repository file in place (as a corrupted
    version would be) must neither change its scores nor crash the process at exit (SIGBUS)."""
    pytest.importorskip("tl2cgen", reason="the compiled runtime needs tl2cgen==1.0.0")
    script = f"""
import numpy as np
from pathlib import Path
from export.compiled_forest import compile_forest, compiled_scorer
from loadtest.bench_model import BenchModelSpec, synthetic_rows, train_bench_model
spec = BenchModelSpec(trees=8, depth=3, features=6, train_rows=500, seed=1)
path = compile_forest(train_bench_model(spec), 6, Path({str(tmp_path)!r}) / "forest.so")
score = compiled_scorer(path, 2)
x = synthetic_rows(50, 6, 2)
before = score(x)
path.write_bytes(b"corrupted in place")
assert np.array_equal(score(x), before)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.returncode, done.stderr[-2000:])
