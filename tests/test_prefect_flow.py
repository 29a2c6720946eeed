"""Prefect 3 flow of the continuous-training loop on a real `prefect server start` (free port, its own PREFECT_HOME,
stopped with nothing left): drifted, labelled traffic -> monitor verdict -> retrain -> @challenger with the flow run
in its lineage; traffic like training -> no retrain; an unreachable server -> one clear error, nothing run."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from bench.monitor import log_predictions
from export.parity import reference_scores
from export.pipeline import export_model
from export.repository import ModelRepository
from monitoring.labels import LABELLED_AT, ingest_labels
from monitoring.monitor import MonitorPaths
from registry import versions as registry
from registry.promotion import AuditLog
from retraining import flows
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.errors import EXIT_DRIFT, EXIT_NO_DATA, EXIT_QUALITY
from treeops.workspace import Workspace

pytestmark = pytest.mark.slow

MODEL = "fraud"
DRIFTED_END = dt.datetime(2026, 3, 1, 13, tzinfo=dt.UTC)
STEADY_END = DRIFTED_END + dt.timedelta(days=1)
PARAMS = TrainParams(num_boost_round=30, max_depth=4, learning_rate=0.2, subsample=0.9, seed=5)
PREFECT = str(Path(sys.executable).parent / "prefect")
SERVER_START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server (`prefect server start`) on a free port over a SQLite database in its own PREFECT_HOME;
    its process group is stopped at the end and checked gone."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited with {server.returncode}: {(home / 'server.log').read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT_S} s: "
                            f"{(home / 'server.log').read_text()}")
            time.sleep(0.5)
        with temporary_settings({PREFECT_API_URL: url, PREFECT_HOME: home / "client"}):
            yield url
    finally:
        try:
            APILogHandler().flush()  # the runs' last log lines reach the server before it stops
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            log.close()
        time.sleep(1)
        with pytest.raises(ProcessLookupError):  # no process of the server's group is left
            os.killpg(server.pid, 0)


@dataclasses.dataclass(frozen=True)
class Served:
    ws: Workspace
    drifted_labels: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """A champion (version 1) trained on 8k rows and exported (its monitoring reference); 3k drifted transactions
    it served logged in the hour before DRIFTED_END, all labelled; 3k like training, not labelled (so no quality
    verdict, whose holdout figures are noisy at this size), in the hour before STEADY_END."""
    ws = Workspace(tmp_path_factory.mktemp("flow_workspace"))
    data = write_transactions(generate_transactions(GenerateSpec(rows=8_000, seed=3)), ws.data_dir / "train.parquet")
    train_and_register(data, "is_fraud", MODEL, params=PARAMS, tracking_uri=ws.tracking_uri,
                       artifact_root=ws.artifact_root)
    export_model(MODEL, ModelRepository(ws.model_repository))
    bundle = registry.load_bundle(registry.resolve(MODEL, alias="champion"), tmp_path_factory.mktemp("bundle"))
    paths = MonitorPaths.in_workspace(ws.root, MODEL)

    def served_traffic(spec: GenerateSpec, end: dt.datetime, first_id: int) -> tuple[pl.DataFrame, list[str]]:
        raw = generate_transactions(spec, first_id=first_id)
        x = bundle.fitted.matrix_raw(raw)
        ids = raw["transaction_id"].cast(pl.String).to_list()
        log_predictions(paths.log_root, bundle.fitted.spec.names, x, reference_scores(bundle.booster, x)[:, -1], ids,
                        end=end)
        return raw, ids

    served_traffic(GenerateSpec(rows=3_000, seed=12), STEADY_END, 2_000_000)
    raw, ids = served_traffic(GenerateSpec(rows=3_000, seed=11, drift=1.0, fraud_rate=0.05), DRIFTED_END, 1_000_000)
    labels = pl.DataFrame({"transaction_id": ids, "label": raw["is_fraud"].cast(pl.Int8),
                           LABELLED_AT: [DRIFTED_END.isoformat()] * len(ids)})
    labels.write_csv(ws.root / "labels.csv")
    ingest_labels(ws.root / "labels.csv", paths.labels_dir, pl.Series(ids))
    return Served(ws, labels.height)


def _task_runs(flow_run_id) -> dict[str, str]:
    """Task name -> final state name of the flow run's task runs, as the Prefect server recorded them."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def test_drift_retrains_and_registers_a_challenger_recorded_on_the_server(prefect_api, served):
    state = flows.continuous_training(model=MODEL, window="1h", end=DRIFTED_END.isoformat(), retrain_window="1h",
                                      workspace=str(served.ws.root), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["monitor"]["exit_code"] in (EXIT_DRIFT, EXIT_QUALITY)
    assert result["monitor"]["versions"][0]["drift"]["drift_detected"]
    assert result["retrain"]["version"] == 2 and result["retrain"]["alias"] == "challenger"
    assert result["retrain"]["lineage"]["labels"] == str(served.drifted_labels)
    flow_run_id = state.state_details.flow_run_id
    assert str(flow_run_id) in result["retrain"]["lineage"]["trigger"]  # the challenger names the run that made it
    assert registry.aliases(MODEL) == {"champion": 1, "challenger": 2}

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    assert run.flow_id is not None and run.state.is_completed() and run.parameters["end"] == DRIFTED_END.isoformat()
    assert _task_runs(flow_run_id) == {"monitor": "Completed", "retrain": "Completed"}


def test_traffic_like_training_without_labels_is_monitored_and_not_retrained(prefect_api, served):
    before = registry.aliases(MODEL)
    state = flows.continuous_training(model=MODEL, window="1h", end=STEADY_END.isoformat(),
                                      workspace=str(served.ws.root), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    [version] = result["monitor"]["versions"]
    assert not version["drift"]["drift_detected"] and version["quality"] is None and version["labelled"] == 0
    assert result["monitor"]["exit_code"] == EXIT_NO_DATA and result["retrain"] is None
    assert result["decision"].startswith("no retrain")
    assert _task_runs(state.state_details.flow_run_id) == {"monitor": "Completed"}
    assert registry.aliases(MODEL) == before


def test_an_expected_error_fails_the_run_without_retries(prefect_api, served, monkeypatch):
    monkeypatch.setenv("TREEOPS_FLOW_RETRY_DELAY_S", "0")
    state = flows.continuous_training(model=MODEL, window="1h", end="2020-01-01T00:00:00",
                                      workspace=str(served.ws.root), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="no logged predictions of model fraud"):
        state.result()
    with get_client(sync_client=True) as client:
        [task_run] = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert task_run.state.is_failed() and task_run.run_count == 1  # an InsufficientDataError is not retried


def test_one_loop_pass_without_triton_is_refused_and_audited(prefect_api, served):
    # the drifted hour: the challenger trains on its first half and is shadowed and gated on the second
    state = flows.loop_once(model=MODEL, window="1h", gate_window="30m", end=DRIFTED_END.isoformat(),
                            workspace=str(served.ws.root), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["decision"] == "refused" and result["champion"] == 1, result
    assert [s["step"] for s in result["steps"]][:4] == ["monitor", "retrain", "export", "shadow"]
    assert registry.aliases(MODEL)["champion"] == 1
    last = AuditLog(served.ws.audit_log).read()[-1]
    assert last["event"] == "loop_decision" and last["reason"].startswith("refused"), last
    assert _task_runs(state.state_details.flow_run_id) == {"loop-once": "Completed"}


def test_serve_registers_the_cron_schedule_on_the_server(prefect_api, served, tmp_path):
    assert flows.check_server() == prefect_api
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path)}
    code = f"from retraining.flows import serve; serve('0 * * * *', model={MODEL!r}, workspace={str(served.ws.root)!r})"
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        deployment = None
        while deployment is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
            with get_client(sync_client=True) as client:
                found = client.read_deployments()
            deployment = next((d for d in found if d.name == "hourly"), None)
        assert deployment is not None, f"no deployment; serve exited {process.poll()}"
        assert [s.schedule.cron for s in deployment.schedules] == ["0 * * * *"]
        assert deployment.parameters == {"model": MODEL, "workspace": str(served.ws.root)}
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_an_unreachable_server_is_one_clear_error_naming_the_url(served):
    url = f"http://127.0.0.1:{_free_port()}/api"
    before = registry.aliases(MODEL)
    with temporary_settings({PREFECT_API_URL: url}), \
            pytest.raises(flows.PrefectServerUnreachableError, match=f"Prefect server at {url} \\(PREFECT_API_URL\\)"):
        flows.run(model=MODEL, workspace=str(served.ws.root))
    assert registry.aliases(MODEL) == before
