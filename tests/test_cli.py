"""The `treeops` command as users run it: exit codes, error messages, --json, nothing half-done."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path

import polars as pl
import pytest

from server.launcher import free_port
from training.generate import GenerateSpec, generate_transactions

COMMANDS = ["demo", "generate", "train", "validate", "export", "sync", "promote", "rollback", "models", "serve",
            "score", "loadtest", "drift", "labels", "monitor", "retrain", "loop", "features backfill", "features show",
            "log ship"]


def _registered_models(workspace: Path) -> list[str]:
    import sqlite3

    db = workspace / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return [r[0] for r in conn.execute("select name from registered_models")]
        except sqlite3.OperationalError:
            return []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, tmp_path, treeops):
    out = treeops(*command.split(), "--help", workspace=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--workspace" in out.stdout


def test_train_on_missing_file_fails_cleanly(tmp_path, treeops):
    out = treeops("train", "--data", str(tmp_path / "missing.csv"), workspace=tmp_path)
    assert out.returncode == 1
    assert "missing.csv does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    assert _registered_models(tmp_path) == []


def _one_error_line(stderr: str) -> str:
    """The `error: ...` line of a failed command, checked to be its only one and without a traceback or usage."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr and "Usage:" not in stderr and "[bt]" not in stderr, stderr
    return errors[0]


def test_train_on_bad_column_registers_nothing(tmp_path, treeops):
    data = tmp_path / "bad.parquet"
    generate_transactions(GenerateSpec(rows=500, seed=2)).drop("country").write_parquet(data)
    out = treeops("train", "--data", str(data), workspace=tmp_path)
    assert out.returncode == 4  # a contract violation, as from `validate`
    assert "bad.parquet FAILED contract" in out.stderr and "country present" in out.stderr
    assert _registered_models(tmp_path) == []


def test_train_with_one_class_target_registers_nothing(tmp_path, treeops):
    data = tmp_path / "one.parquet"
    generate_transactions(GenerateSpec(rows=500, seed=2)).with_columns(is_fraud=pl.lit(0)).write_parquet(data)
    out = treeops("train", "--data", str(data), workspace=tmp_path)
    assert out.returncode == 1
    assert "only one class" in out.stderr
    assert _registered_models(tmp_path) == []


def test_export_of_unknown_model_lists_what_exists(trained, treeops):
    out = treeops("export", "--model-name", "nope", workspace=trained.ws.root)
    assert out.returncode == 1
    assert "no registered model 'nope'; registered models: ['fraud']" in out.stderr


def test_serve_on_a_taken_port_says_how_to_fix(tmp_path, treeops):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        out = treeops("serve", "--insecure-admin", "--grpc-port", str(port), "--http-port", str(free_port()),
                      "--metrics-port", str(free_port()), workspace=tmp_path)
    assert out.returncode == 1
    assert f"gRPC port {port}" in out.stderr and "--grpc-port" in out.stderr


def test_invalid_setting_is_reported_without_traceback(tmp_path, treeops):
    out = treeops("serve", "--http-port", "0", workspace=tmp_path)
    assert out.returncode == 2
    assert "invalid setting (TritonSettings): http_port" in _one_error_line(out.stderr)


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_the_same_port_twice_is_an_invalid_setting_not_tritons_usage(command, tmp_path, treeops):
    port = str(free_port())
    out = treeops(command, "--grpc-port", port, "--http-port", port, "--metrics-port", str(free_port()),
                  workspace=tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"ports must differ (grpc_port {port}, http_port {port}" in _one_error_line(out.stderr)


@pytest.mark.parametrize(("args", "code", "kind", "message"), [
    (["train", "--data", "missing.csv"], 1, "DataError", "missing.csv does not exist"),
    (["train", "--data", "x.csv", "--engine", "spark"], 2, "SettingsError", "unknown engine 'spark'"),
    (["train", "--data", "x.csv", "--no-such-flag"], 2, "InvalidSettingsError", "No such option: --no-such-flag"),
    (["serve", "--http-port", "0"], 2, "InvalidSettingsError", "invalid setting (TritonSettings): http_port"),
    (["score", "--data", "missing.parquet"], 1, "ScoringError", "is not in the repository"),
    (["models", "--model-name", "nope"], 1, "ModelNotFoundError", "nope"),
])
def test_json_failure_is_one_error_object_on_stdout(args, code, kind, message, tmp_path, treeops):
    out = treeops(*args, "--json", workspace=tmp_path)
    assert out.returncode == code, out.stderr
    body = json.loads(out.stdout)
    assert body["exit_code"] == code and body["kind"] == kind and message in body["error"], body
    assert body["error"] in _one_error_line(out.stderr)


def test_binary_data_file_and_nan_target_are_one_line_data_errors(tmp_path, treeops):
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 16)  # what an executable starts with
    out = treeops("train", "--data", str(binary), "--target", "label", workspace=tmp_path)
    assert out.returncode == 1
    assert _one_error_line(out.stderr).startswith(f"error: not a CSV/Parquet file: {binary} ")
    nan = tmp_path / "nan.csv"
    pl.DataFrame({"x": [float(i) for i in range(200)],
                  "label": [float("nan") if i in (3, 7) else i % 3 / 2 for i in range(200)]}).write_csv(nan)
    out = treeops("train", "--data", str(nan), "--target", "label", workspace=tmp_path)
    assert out.returncode == 1
    assert "target column 'label' of " in _one_error_line(out.stderr) and "(rows 4, 8)" in out.stderr
    assert _registered_models(tmp_path) == []


def test_unknown_export_target_exits_2(trained, treeops):
    out = treeops("export", "--target", "tensorrt", workspace=trained.ws.root)
    assert out.returncode == 2, out.stderr
    assert "tensorrt" in _one_error_line(out.stderr)


def test_corrupt_registered_booster_is_one_line_naming_the_model(trained, treeops):
    import shutil

    [model_file] = list(trained.ws.artifact_root.glob("models/*/artifacts/model.*json"))
    original = model_file.read_bytes()
    exported = trained.repository.model_dir("fraud")
    aside = exported.with_name("fraud.aside")
    exported.rename(aside)  # so that export reads the booster instead of keeping the exported version
    try:
        model_file.write_bytes(original[: len(original) // 2])
        out = treeops("export", "--version", "1", workspace=trained.ws.root)
    finally:
        model_file.write_bytes(original)
        shutil.rmtree(exported, ignore_errors=True)
        aside.rename(exported)
    assert out.returncode == 1, out.stderr
    line = _one_error_line(out.stderr)
    assert "booster file of model 'fraud' version 1 (models:/m-" in line and "is not a readable XGBoost model" in line


def test_generate_and_drift_exit_codes(tmp_path, treeops):
    for name, drift in (("train", "0"), ("current", "0"), ("shifted", "1")):
        seed = {"train": "1", "current": "2", "shifted": "3"}[name]
        out = treeops("generate", "--rows", "20000", "--seed", seed, "--drift", drift,
                      "--out", str(tmp_path / "data" / f"{name}.parquet"), workspace=tmp_path)
        assert out.returncode == 0, out.stderr
    same = treeops("drift", "--json", workspace=tmp_path)
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["drift_detected"] is False
    shifted = treeops("drift", "--current", str(tmp_path / "data" / "shifted.parquet"), "--name", "s", workspace=tmp_path)
    assert shifted.returncode == 3, shifted.stderr
    assert "DRIFT DETECTED" in shifted.stdout
    assert "drift detected:" in _one_error_line(shifted.stderr)
    assert (tmp_path / "reports" / "s.html").exists()
    as_json = treeops("drift", "--current", str(tmp_path / "data" / "shifted.parquet"), "--json", workspace=tmp_path)
    assert as_json.returncode == 3
    body = json.loads(as_json.stdout)
    assert body["kind"] == "DriftDetectedError" and body["exit_code"] == 3 and body["drift_detected"] is True


@pytest.mark.triton
def test_loadtest_command_passes_and_fails_on_budgets(trained, triton, treeops):
    args = ["loadtest", "--duration-s", "3", "--users", "4", "--data", str(trained.data),
            "--triton-url", triton.settings.grpc_url, "--http-url", triton.settings.http_url]
    ok = treeops(*args, "--protocol", "grpc", "--protocol", "http", "--json", workspace=trained.ws.root)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    body = json.loads(ok.stdout)
    assert body["passed"] and body["requests"] > 0 and body["failures"] == 0
    breach = treeops(*args, "--p99-ms", "0.001", workspace=trained.ws.root)
    assert breach.returncode == 1
    assert "p99_ms" in breach.stdout and "FAIL" in breach.stdout
    assert "load test missed its SLO: p99_ms" in _one_error_line(breach.stderr)


def test_validate_and_train_refuse_a_broken_file_listing_every_rule(tmp_path, treeops):
    data = tmp_path / "broken.parquet"
    frame = generate_transactions(GenerateSpec(rows=2_000, seed=6))
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 10).then(-5.0).otherwise("amount").alias("amount"),
        pl.when(pl.int_range(pl.len()) == 20).then(pl.lit("carrier pigeon")).otherwise("channel").alias("channel"),
    ).drop("country")
    frame.write_parquet(data)
    checked = treeops("validate", "--data", str(data), "--json", workspace=tmp_path)
    assert checked.returncode == 4, checked.stderr
    body = json.loads(checked.stdout)
    assert body["kind"] == "ContractViolationError" and body["exit_code"] == 4
    failed = {(v["column"], v["rule"]) for v in body["violations"]}
    assert {("country", "present"), ("amount", "range"), ("channel", "allowed")} <= failed
    refused = treeops("train", "--data", str(data), "--json", workspace=tmp_path)
    assert refused.returncode == 4  # the same condition, the same code
    assert json.loads(refused.stdout)["kind"] == "ContractViolationError"
    assert "broken.parquet" in refused.stderr and "country" in refused.stderr and "channel" in refused.stderr
    assert list((tmp_path / "reports").glob("contract-violations-*.json"))
    assert _registered_models(tmp_path) == []



@pytest.mark.triton
def test_serve_runs_until_sigterm_and_leaves_nothing_behind(trained, tmp_path):
    import shutil
    import signal
    import subprocess
    import urllib.request

    from conftest import TREEOPS

    # A workspace of its own: serve refuses one whose Triton (the session fixture's) already runs.
    shutil.copytree(trained.ws.model_repository, tmp_path / "model_repository")
    env = {**os.environ, "TREEOPS_TRITON_ADMIN_KEY": "k" * 32}
    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.Popen([TREEOPS, "serve", "--grpc-port", ports[0], "--http-port", ports[1], "--metrics-port",
                             ports[2], "--json", "--workspace", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        ready = json.loads(proc.stdout.readline() or "null")  # `serve --json`: one line once Triton is ready
        assert ready and ready["ready"] and ready["grpc_port"] == int(ports[0]), proc.stderr.read()
        assert ready["models"] == {"fraud": 1} and ready["pid"] > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/models/fraud/ready", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        rest, out = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert rest == "", rest  # stdout held only the ready line
    assert "Triton stopped" in out and "ERROR" not in out, out
    leftover = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.strip()
    assert not leftover, f"processes left in the session: {leftover}"


@pytest.mark.triton
@pytest.mark.slow
def test_demo_runs_end_to_end_and_stops_triton(tmp_path, treeops):
    import subprocess

    ports = [str(free_port()) for _ in range(3)]
    out = treeops("demo", "--rows", "20000", "--loadtest-s", "2", "--grpc-port", ports[0], "--http-port", ports[1],
                  "--metrics-port", ports[2], "--json", workspace=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["served_version"] == 1
    assert summary["parity_max_abs_diff"] <= 1e-5 and summary["parity_flipped"] == 0
    assert summary["scored_rows"] > 0 and summary["backfill_rows"] > 0
    assert summary["served_parity_passed"] and summary["served_flipped"] == 0
    assert summary["served_max_abs_diff"] <= 1e-5
    assert summary["roc_auc"] > summary["roc_auc_without_history"]
    assert summary["logged_rows"] >= summary["scored_rows"]  # every replayed transaction, then Locust's
    window = summary["monitor"]["versions"][0]
    assert window["version"] == 1 and window["labelled"] > 0, window
    assert summary["loadtest"]["passed"] and summary["loadtest"]["failures"] == 0
    assert summary["drift_current"] is False and summary["drift_shifted"] is True
    # the drifted traffic: the loop retrained, gated and promoted version 2, which answers at the end
    loop = summary["loop"]
    assert loop["decision"] == "promoted" and loop["champion"] == 2, loop["reason"]
    assert [s["step"] for s in loop["steps"]] == ["monitor", "retrain", "export", "shadow", "decision"]
    assert [c["name"] for c in loop["gate"]["checks"]] == ["parity", "quality", "slo"]
    assert summary["served_version_end"] == 2
    # the monitor window over the demo's own traffic ends where the drifted traffic starts: version 1 only
    window = {k: dt.datetime.fromisoformat(t) for k, t in summary["drift_window"].items()}
    assert dt.datetime.fromisoformat(summary["monitor"]["end"]) <= window["start"] < window["gate_from"]
    assert [w["version"] for w in summary["monitor"]["versions"]] == [1]
    running = subprocess.run(["pgrep", "-f", f"tritonserver.*--grpc-port={ports[0]}"], capture_output=True, text=True)
    assert running.stdout.strip() == "", "demo left Triton running"
