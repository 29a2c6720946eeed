"""Prefect 3 flows over the continuous-training steps: the same library functions `treeops monitor`, `treeops
retrain` and `treeops loop --once` call, as Prefect tasks with Prefect's run logger.

`continuous_training`: monitor, then on drift or a quality drop retrain (@challenger), tasks retried on unexpected
failures. `loop_once`: one pass of retraining/loop.py (monitor -> retrain -> export -> shadow -> gate -> promote,
under the workspace's lock, every step audited) as one task, not retried: a half-done pass is the next run's job.

Where runs are recorded is Prefect's own setting: with `PREFECT_API_URL` unset, Prefect starts its embedded local
server for the process (a temporary server over the SQLite database in `PREFECT_HOME`); with it set, runs go to that
server (`prefect server start`, or any Prefect server), which is checked first (`run` and `serve`). `serve(cron)`
runs the flow on a schedule from a long-lived process, as `flow.serve` does.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import TaskRun
from prefect.settings import PREFECT_API_URL
from prefect.states import State
from prefect.tasks import Task
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from monitoring.monitor import MonitorPaths, MonitorResult, MonitorSettings, parse_end, parse_window, run_monitor
from retraining.loop import LoopOutcome, LoopSettings, run_loop_once
from retraining.retrain import RetrainOutcome, RetrainSettings, retrain_from_log
from treeops.errors import EXIT_DRIFT, EXIT_QUALITY, TreeopsError
from treeops.workspace import Workspace

FLOW_NAME = "treeops-continuous-training"
LOOP_FLOW_NAME = "treeops-loop"
#: Monitor verdicts that start a retrain: a quality drop (exit 5) or drift (exit 3), as `treeops monitor` exits.
RETRAIN_ON = (EXIT_QUALITY, EXIT_DRIFT)


class FlowSettings(BaseSettings):
    """How the flow's tasks retry and how long the Prefect server check waits. Env `TREEOPS_FLOW_`."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_FLOW_", extra="forbid", frozen=True)

    retries: int = Field(2, ge=0, description="retries of a task that failed unexpectedly (treeops' own errors: none)")
    retry_delay_s: float = Field(30.0, ge=0, description="seconds between a task's retries")
    healthcheck_timeout_s: float = Field(10.0, gt=0, description="how long the Prefect server at PREFECT_API_URL "
                                         "may take to answer its health check")


class PrefectServerUnreachableError(TreeopsError):
    """The Prefect server named by PREFECT_API_URL did not answer its health check; nothing ran."""


def _retry_unexpected(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry what may pass on its own (a network or I/O failure); an expected treeops error (no data, too few
    labels, no champion) fails the task at once, as the CLI would."""
    try:
        state.result()
    except TreeopsError:
        return False
    except Exception:
        return True
    return True


@task(name="monitor", cache_policy=NO_CACHE, retry_condition_fn=_retry_unexpected)
def monitor_step(model: str, start: dt.datetime, end: dt.datetime, workspace: Path) -> MonitorResult:
    """`treeops monitor` of [start, end): run_monitor over the workspace's log, labels and repository."""
    result = run_monitor(model, start, end, MonitorPaths.in_workspace(workspace, model), settings=MonitorSettings())
    logger = get_run_logger()
    for line in result.lines():
        logger.info("%s", line)
    return result


@task(name="retrain", cache_policy=NO_CACHE, retry_condition_fn=_retry_unexpected)
def retrain_step(model: str, start: dt.datetime, end: dt.datetime, workspace: Path, trigger: str) -> RetrainOutcome:
    """`treeops retrain` of [start, end): retrain_from_log, registering the challenger as @challenger."""
    ws = Workspace.resolve(workspace)
    outcome = retrain_from_log(model, start, end, MonitorPaths.in_workspace(ws.root, model),
                               tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root, trigger=trigger,
                               settings=RetrainSettings())
    get_run_logger().info("registered %s version %d as @%s (run %s), test %s", model, outcome.registered.version,
                          outcome.registered.alias, outcome.registered.run_id,
                          {k: round(v, 4) for k, v in outcome.metrics.items()})
    return outcome


@flow(name=FLOW_NAME, validate_parameters=True)
def continuous_training(model: str = "fraud", window: str = "1h", end: str | None = None, retrain_window: str = "7d",
                        workspace: str | None = None) -> dict[str, Any]:
    """Monitor the window of served traffic ending at `end` (ISO 8601, default now); on drift or a quality drop,
    retrain on the `retrain_window` of traffic before `end` and register @challenger.

    Returns `{"monitor": ..., "decision": ..., "retrain": ... or None}` (the monitor result's and the retrain
    outcome's `to_dict()`).
    """
    settings = FlowSettings()
    retry = {"retries": settings.retries, "retry_delay_seconds": settings.retry_delay_s}
    root = Workspace.resolve(Path(workspace) if workspace else None).root
    stop = parse_end(end)
    start = stop - parse_window(window)
    verdict = monitor_step.with_options(**retry)(model, start, stop, root)
    logger = get_run_logger()
    if verdict.exit_code not in RETRAIN_ON:
        decision = f"no retrain: the monitor's exit code is {verdict.exit_code} (retrain on {list(RETRAIN_ON)})"
        logger.info("%s", decision)
        return {"monitor": verdict.to_dict(), "decision": decision, "retrain": None}
    trigger = (f"monitor {model} {start:%Y%m%dT%H%M%SZ}--{stop:%Y%m%dT%H%M%SZ} exit {verdict.exit_code} "
               f"(prefect flow run {runtime.flow_run.id})")
    logger.info("retraining: %s", trigger)
    outcome = retrain_step.with_options(**retry)(model, stop - parse_window(retrain_window), stop, root, trigger)
    decision = f"retrained: {model} version {outcome.registered.version} registered as @{outcome.registered.alias}"
    return {"monitor": verdict.to_dict(), "decision": decision, "retrain": outcome.to_dict()}


@task(name="loop-once", cache_policy=NO_CACHE)
def loop_step(model: str, end: dt.datetime, workspace: Path, settings: LoopSettings, triton_url: str | None
              ) -> LoopOutcome:
    """`treeops loop --once`: run_loop_once, with a model-control client of the Triton at `triton_url` if given."""
    from server.admin import model_control

    control = model_control(triton_url)
    outcome = run_loop_once(model, end, Workspace.resolve(workspace), settings, triton=control, grpc_url=triton_url)
    logger = get_run_logger()
    for line in outcome.lines():
        logger.info("%s", line)
    return outcome


@flow(name=LOOP_FLOW_NAME, validate_parameters=True)
def loop_once(model: str = "fraud", window: str = "7d", gate_window: str = "1d", end: str | None = None,
              workspace: str | None = None, triton_url: str | None = None) -> dict[str, Any]:
    """One pass of the loop over `window` ending at `end` (ISO 8601, default now), the challenger gated on its
    newest `gate_window` (the gate's settings: TREEOPS_GATE_*); `triton_url`: the running Triton's gRPC address,
    without which no challenger passes the gate. Returns the LoopOutcome's `to_dict()`."""
    root = Workspace.resolve(Path(workspace) if workspace else None).root
    settings = LoopSettings(window=parse_window(window), gate_window=parse_window(gate_window))
    return loop_step(model, parse_end(end), root, settings, triton_url).to_dict()


def check_server(settings: FlowSettings | None = None) -> str | None:
    """The Prefect server at PREFECT_API_URL, checked to answer; None: unset, Prefect's embedded server is used.

    Raises:
        PrefectServerUnreachableError: the server did not answer its health check in time.
    """
    url = PREFECT_API_URL.value()
    if not url:
        return None
    timeout_s = (settings or FlowSettings()).healthcheck_timeout_s
    with get_client(httpx_settings={"timeout": timeout_s}, sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise PrefectServerUnreachableError(
            f"the Prefect server at {url} (PREFECT_API_URL) did not answer its health check within {timeout_s:g} s "
            f"({type(failure).__name__}: {failure}); start it (`prefect server start`), fix PREFECT_API_URL, or unset "
            "it to run on Prefect's embedded local server")
    return url


def run(**parameters: Any) -> dict[str, Any]:
    """One run of `continuous_training` with `parameters`, after checking the Prefect server (if one is named)."""
    check_server()
    return continuous_training(**parameters)


def serve(cron: str, *, name: str = "hourly", **parameters: Any) -> None:
    """Serve `continuous_training` as deployment `name` run on `cron` with `parameters`, until interrupted."""
    check_server()
    continuous_training.serve(name=name, cron=cron, parameters=parameters)
