"""Locust users scoring single rows against Triton: `TritonGrpcUser` (gRPC) and `TritonHttpUser` (HTTP).

Both build every request from the served model's signature (its inputs' names, datatypes and dims),
so they drive feature-tensor, FIL and raw-input models alike.

Environment:
  TREEOPS_LT_ROWS       .npz request rows (one array per model input, rows x dims), one row per request, round-robin
  TREEOPS_LT_SIGNATURE  the served model's signature as JSON (ServedSignature.to_dict)
  TREEOPS_LT_MODEL      model name (default "fraud")
  TREEOPS_LT_GRPC_URL   host:port of Triton's gRPC endpoint (needed by TritonGrpcUser)
  TREEOPS_LT_TIMEOUT_S  per-request deadline in seconds (default 5)
The HTTP user's server is Locust's `--host` (http://127.0.0.1:8000); choose users by class name on the
command line (or Locust's own LOCUST_USER_CLASSES). Both users are closed loop (no wait between requests).
"""

from __future__ import annotations

# Locust first (it gevent-patches the standard library), then gRPC's gevent mode before any channel
# exists: without it every user shares one in-flight request and nothing errors.
from locust import FastHttpUser, User, constant, events, task
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import csv  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import gevent  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from export.signature import ServedSignature  # noqa: E402
from loadtest.errors import RequestFailedError, SettingsError  # noqa: E402
from loadtest.protocols import (  # noqa: E402
    ENV_GRPC_URL, ENV_MODEL, ENV_ROWS, ENV_SIGNATURE, ENV_TIMEOUT_S, REQUEST_NAMES, USER_CLASSES,
)
from loadtest.rows import load_rows  # noqa: E402
from server.errors import ScoringError  # noqa: E402
from server.requests import conform, grpc_request, http_body  # noqa: E402

log = logging.getLogger(__name__)

_next_index = itertools.count()  # shared by all users: rows are drawn round-robin across the process


@dataclass(frozen=True)
class LoadConfig:
    """What the users send and where, read once from the environment."""

    feeds: dict[str, np.ndarray]  # conformed to the signature: input name -> rows x dims
    signature: ServedSignature
    model: str
    grpc_url: str | None
    timeout_s: float

    @property
    def n_rows(self) -> int:
        return len(next(iter(self.feeds.values())))

    def next_row(self) -> dict[str, np.ndarray]:
        """The next row of every input (1 x dims each)."""
        i = next(_next_index) % self.n_rows
        return {name: v[i : i + 1] for name, v in self.feeds.items()}


@functools.cache
def load_config() -> LoadConfig:
    """The users' settings from the environment, read once per process."""
    rows_path = os.environ.get(ENV_ROWS)
    if not rows_path:
        raise SettingsError(f"{ENV_ROWS} is not set: point it at a .npz row file (loadtest.rows.write_sample_rows)")
    timeout = os.environ.get(ENV_TIMEOUT_S, "5")
    try:
        timeout_s = float(timeout)
    except ValueError:
        raise SettingsError(f"{ENV_TIMEOUT_S}={timeout!r} is not a number of seconds") from None
    try:
        signature = ServedSignature.from_dict(json.loads(os.environ[ENV_SIGNATURE]))
    except (KeyError, ValueError, TypeError) as exc:
        raise SettingsError(f"{ENV_SIGNATURE} is missing or not a signature ({exc!r}): set it to "
                            "json.dumps(ServedSignature.to_dict())") from None
    try:
        feeds = conform(signature, load_rows(rows_path))
    except ScoringError as exc:
        raise SettingsError(f"rows {rows_path} do not fit the signature: {exc}") from None
    return LoadConfig(
        feeds=feeds,
        signature=signature,
        model=os.environ.get(ENV_MODEL, "fraud"),
        grpc_url=os.environ.get(ENV_GRPC_URL) or None,
        timeout_s=timeout_s,
    )


@events.init.add_listener
def _check_config(environment: Environment, **_: object) -> None:
    """Fail at start-up (Locust exits 1) when the selected users lack what they need."""
    config = load_config()
    selected = {cls.__name__ for cls in environment.user_classes}
    if USER_CLASSES["grpc"] in selected and not config.grpc_url:
        raise SettingsError(f"{USER_CLASSES['grpc']} needs {ENV_GRPC_URL}=host:port of Triton's gRPC endpoint")
    if USER_CLASSES["http"] in selected and not environment.host:
        raise SettingsError(f"{USER_CLASSES['http']} needs --host http://<host>:<port> of Triton's HTTP endpoint")
    log.info("%s: %d rows to model %r (%s)", ", ".join(sorted(selected)), config.n_rows, config.model,
             config.signature.describe())
    # --run-time is scheduled on gevent's cached clock, stale by the time start-up took: refresh it.
    gevent.get_hub().loop.update_now()


@events.quitting.add_listener
def _write_final_stats(environment: Environment, **_: object) -> None:
    """Rewrite `<prefix>_stats.csv` with the final figures: Locust refreshes it only once a second (locust#1806)."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        stats = StatsCSV(environment, PERCENTILES_TO_REPORT)
        with open(f"{prefix}_stats.csv", "w", newline="") as f:
            stats.requests_csv(csv.writer(f))
        with open(f"{prefix}_failures.csv", "w", newline="") as f:
            stats.failures_csv(csv.writer(f))


class TritonGrpcUser(User):
    """One single-row gRPC inference after another, over this user's own channel."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.config = load_config()
        self.triton = grpcclient.InferenceServerClient(self.config.grpc_url)

    def on_stop(self) -> None:
        self.triton.close()

    @task
    def infer(self) -> None:
        inputs, outputs = grpc_request(self.config.signature, self.config.next_row())
        length, error = 0, None
        start = time.perf_counter()
        try:
            result = self.triton.infer(self.config.model, inputs, outputs=outputs, client_timeout=self.config.timeout_s)
            length = result.get_response().ByteSize()
        except InferenceServerException as exc:  # Locust would show its str() empty
            error = RequestFailedError(f"{exc.status()}: {exc.message()}")
        self.environment.events.request.fire(
            request_type="grpc", name=REQUEST_NAMES["grpc"], response_time=(time.perf_counter() - start) * 1000,
            response_length=length, exception=error, context={},
        )


class TritonHttpUser(FastHttpUser):
    """One single-row KServe v2 JSON inference after another (POST /v2/models/<model>/infer)."""

    wait_time = constant(0)

    def __init__(self, environment: Environment) -> None:
        self.config = load_config()
        self.network_timeout = self.connection_timeout = self.config.timeout_s
        super().__init__(environment)
        self.path = f"/v2/models/{self.config.model}/infer"

    @task
    def infer(self) -> None:
        body = http_body(self.config.signature, self.config.next_row())
        with self.client.post(self.path, json=body, name=REQUEST_NAMES["http"], catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text}")
