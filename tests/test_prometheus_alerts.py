"""The shipped alert rules on a real Prometheus scraping a real Triton: the error-budget alert fires under an
honest overload and resolves when it ends; every dashboard query runs on the same Prometheus.

Why these choices:
- Clock: the rules are `render(AlertSettings().on_faster_clock(120))`, the shipped rules with every window and
  `for` divided by 120 (1h/5m -> 30s/2.5s, 6h/30m -> 3m/15s, for 2m -> 1s); Prometheus scrapes and evaluates
  every 0.5 s. Same expressions, same thresholds, a clock a test can wait for.
- Failures: tritonserver 2.51 leaves `nv_inference_request_failure` at 0 for requests its frontend rejects
  (unknown input, wrong shape or type), for a full queue (`max_queue_size`) and for error answers of Python-backend
  models (checked on a live server), so malformed requests cannot move it. What it counts is a request that waited
  past the model's queue deadline (reason REJECTED). The served version gets a 1 ms queue deadline with REJECT
  (written into a copy of the exported config; the export has no such setting yet) and a bulk client keeps 32
  requests of 1024 rows in flight: the queue outgrows the deadline and Triton sheds requests, as it would in
  production. A short Locust load (one closed-loop user, single rows) runs throughout, so the alert resolves on
  live traffic, not on silence.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from loadtest.pipeline import loadtest_served_model
from loadtest.runner import LoadtestResult
from monitoring import alert_rules, dashboard, metric_names
from monitoring.alert_settings import AlertSettings
from server.launcher import TritonServer, free_port
from triton_fixtures import MODEL, serving

pytestmark = [pytest.mark.triton, pytest.mark.slow]

SPEEDUP = 120
STEP_S = 0.5  # scrape and evaluation interval
QUEUE_DEADLINE_US = 1000
FLOOD_IN_FLIGHT, FLOOD_ROWS = 32, 1024
LOAD_S = 70  # the Locust load: baseline, overload until firing (<= 30 s), recovery until resolved (<= 40 s)
RESOLVE_S = 40  # the 15 s short window of the 6x pair forgets the overload; a loaded CI machine scrapes late
ALERT = "TreeopsErrorBudgetBurn"
PROMETHEUS_INSTALL = "install Debian's prometheus package (`make` does it; by hand: apt-get install -y prometheus)"


class LocalPrometheus:
    """A real `prometheus` on a free loopback port with its config, rules and data in `directory`."""

    def __init__(self, directory: Path, targets: list[str], rules: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(f"prometheus is not on PATH: {PROMETHEUS_INSTALL}")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rules.yml").write_text(rules)
        step = f"{int(STEP_S * 1000)}ms"
        config = {"global": {"scrape_interval": step, "evaluation_interval": step},
                  "rule_files": [str(directory / "rules.yml")],
                  "scrape_configs": [{"job_name": "triton", "static_configs": [{"targets": targets}]}]}
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "prometheus.log"
        self.command = [binary, f"--config.file={directory / 'prometheus.yml'}",
                        f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30) -> LocalPrometheus:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_for(self._ready, timeout_s, f"prometheus ready on {self.url} (log {self.log_path})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"prometheus exited: {self.log_tail()}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, then fail (after SIGKILL) if it is still running 10 s later."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"prometheus ignored SIGTERM for 10 s: {self.log_tail()}")

    def api(self, path: str, **params: str) -> Any:
        """`data` of a successful Prometheus API answer (fails the test on an error answer)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `condition` until true; returns the seconds it took, fails the test naming `what` after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(STEP_S / 2)
    return time.monotonic() - start


def with_queue_deadline(source: Path, target: Path) -> Path:
    """A copy of model repository `source` whose MODEL rejects requests queued longer than QUEUE_DEADLINE_US."""
    shutil.copytree(source / MODEL, target / MODEL)
    path = target / MODEL / "config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    policy = config.dynamic_batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = QUEUE_DEADLINE_US
    path.write_text(text_format.MessageToString(config))
    return target


@dataclass
class Stack:
    triton: TritonServer
    prometheus: LocalPrometheus
    repository: Path


@pytest.fixture(scope="module")
def stack(trained, tmp_path_factory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("prometheus-alerts")
    repository = with_queue_deadline(trained.ws.model_repository, root / "repository")
    rules = alert_rules.render(AlertSettings().on_faster_clock(SPEEDUP))
    with serving(trained.ws, root / "triton.log", repository=repository, exit_timeout_s=2) as triton:
        prometheus = LocalPrometheus(root / "prometheus", [f"127.0.0.1:{triton.settings.metrics_port}"], rules)
        try:
            yield Stack(triton, prometheus.start(), repository)
        finally:
            prometheus.stop()


class Flood:
    """A bulk client keeping FLOOD_IN_FLIGHT requests of FLOOD_ROWS rows in flight until stopped."""

    def __init__(self, grpc_url: str, n_features: int) -> None:
        self.client = grpcclient.InferenceServerClient(grpc_url)
        x = np.random.default_rng(5).normal(size=(FLOOD_ROWS, n_features)).astype(np.float32)
        self.inputs = [grpcclient.InferInput("features", list(x.shape), "FP32")]
        self.inputs[0].set_data_from_numpy(x)
        self.slots = threading.BoundedSemaphore(FLOOD_IN_FLIGHT)
        self.errors: dict[str, int] = {}
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _done(self, result: Any, error: Any) -> None:
        if error is None:
            self.answered += 1
        else:
            self.errors[error.message()] = self.errors.get(error.message(), 0) + 1
        self.slots.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.slots.acquire()
            self.client.async_infer(MODEL, self.inputs, self._done)
        for _ in range(FLOOD_IN_FLIGHT):  # every request answered before the client closes
            self.slots.acquire()
        self.client.close()

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the flood's requests were not all answered within 30 s"


def _states(prometheus: LocalPrometheus) -> set[str]:
    return {a["state"] for a in prometheus.alerts(ALERT) if a["labels"].get("model") == MODEL}


def test_error_budget_alert_fires_under_overload_and_resolves_after(stack, trained, tmp_path):
    prom = stack.prometheus
    outcome: dict[str, LoadtestResult | BaseException] = {}

    def light_load() -> None:
        try:
            outcome["result"] = loadtest_served_model(
                stack.repository, MODEL, trained.data, tmp_path / "locust", grpc_url=stack.triton.settings.grpc_url,
                http_url=stack.triton.settings.http_url, protocols=("grpc",), users=1, duration_s=LOAD_S)
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    locust = threading.Thread(target=light_load, daemon=True)
    locust.start()
    served = f'sum(rate({metric_names.TRITON_REQUEST_SUCCESS.name}{{model="{MODEL}"}}[2s])) > 50'
    wait_for(lambda: bool(prom.query(served)), 30, "Prometheus to see Locust's requests")
    assert _states(prom) == set(), "the alert is active before any overload"

    with closing(grpcclient.InferenceServerClient(stack.triton.settings.grpc_url)) as client:
        n_features = client.get_model_config(MODEL).config.input[0].dims[0]
    with Flood(stack.triton.settings.grpc_url, n_features) as flood:
        fired_s = wait_for(lambda: _states(prom) == {"firing"}, 30, f"{ALERT} firing for {MODEL}")
    assert flood.errors, "the overload got every request answered: no failure was provoked"
    assert set(flood.errors) == {"Request timeout expired"}, flood.errors
    rejected = prom.query(f'sum by (reason) ({metric_names.TRITON_REQUEST_FAILURE.name}{{model="{MODEL}"}}) > 0')
    assert [r["metric"]["reason"] for r in rejected] == ["REJECTED"]

    resolved_s = wait_for(lambda: _states(prom) == set(), RESOLVE_S, f"{ALERT} to resolve after the overload")
    assert locust.is_alive(), f"the alert resolved only after the Locust load ended ({LOAD_S} s): raise LOAD_S"
    locust.join(timeout=LOAD_S + 60)
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    assert isinstance(result, LoadtestResult) and result.aggregate.requests > 0
    print(f"{ALERT}: firing {fired_s:.1f} s after the overload began ({sum(flood.errors.values())} rejected, "
          f"{flood.answered} answered bulk requests), resolved {resolved_s:.1f} s after it ended; Locust: "
          f"{result.aggregate.requests} requests, {result.aggregate.failures} failed")


GRAFANA_VARIABLES = {"$__rate_interval": "5s", "$model": ".*"}  # what Grafana sends with "All" models


def _panel_queries() -> list[tuple[str, str]]:
    board = json.loads(dashboard.DASHBOARD_FILE.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel["targets"]]


def _metrics_in(expr: str) -> list[metric_names.Metric]:
    return [m for m in metric_names.ALL if re.search(rf"\b{m.name}(_bucket|_count|_sum)?\b", expr)]


def test_every_dashboard_query_runs_on_prometheus(stack):
    queries = _panel_queries()
    assert queries
    for title, expr in queries:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"panel {title!r}: a Grafana variable the test does not fill: {expr}"
        metrics = _metrics_in(expr)
        assert metrics, f"panel {title!r} reads no declared metric: {expr}"
        result = stack.prometheus.query(expr)  # fails on a PromQL error
        if all(m.source == "triton" for m in metrics):
            assert result, f"panel {title!r} has no data though Triton publishes its metrics: {expr}"
