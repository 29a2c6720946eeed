"""Run Locust headless against Triton in a subprocess and judge the statistics against an SLO."""

from __future__ import annotations

import csv
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from export.signature import ServedSignature
from loadtest.errors import LocustRunError, RowsFileError
from loadtest.protocols import (
    ENV_GRPC_URL, ENV_MODEL, ENV_ROWS, ENV_SIGNATURE, ENV_TIMEOUT_S, REQUEST_NAMES, USER_CLASSES, ProtocolName,
)
from loadtest.rows import load_rows
from loadtest.slo import SLO, RequestStats, SLOCheck
from server.errors import ScoringError
from server.requests import conform, read_signature

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
STOP_GRACE_S = 10.0
NO_REQUESTS = RequestStats(requests=0, failures=0, rps=0.0, p50_ms=None, p95_ms=None, p99_ms=None)
SHOWN_ERRORS = 3
ERROR_CHARS = 300
_EXCEPTION_REPR = re.compile(r"^\w+\((['\"])(.*)\1\)$", re.S)


class LoadtestSettings(BaseSettings):
    """One load test against a local Triton. Env prefix `TREEOPS_LOADTEST_`."""

    model_config = SettingsConfigDict(env_prefix="TREEOPS_LOADTEST_", extra="forbid")

    rows_path: Path = Field(description=".npz request rows (one array per model input, rows x dims), one row per request")
    out_dir: Path = Field(description="folder for the stats CSV, the HTML report and Locust's log")
    grpc_url: str | None = Field(None, description="host:port of Triton's gRPC endpoint (loopback only)")
    http_url: str | None = Field(None, description="host:port of Triton's HTTP endpoint (loopback only)")
    model: str = Field("fraud", description="model name Triton serves")
    signature: ServedSignature | None = Field(
        None, description="the signature requests are built from (default: read from the model's metadata)")
    protocols: tuple[ProtocolName, ...] = Field(("grpc",), min_length=1, description="grpc, http or both")
    users: int = Field(16, ge=1, description="concurrent closed-loop users, split evenly across protocols")
    spawn_rate: float | None = Field(None, gt=0, description="users started per second (default: all at once)")
    duration_s: int = Field(10, ge=1, description="how long traffic runs")
    request_timeout_s: float = Field(5.0, gt=0, description="per-request deadline")
    grace_s: float = Field(30.0, gt=0, description="time past duration_s before Locust is killed")
    slo: SLO = Field(default_factory=lambda: SLO(max_error_rate=0.0), description="default: no failed requests")

    @model_validator(mode="after")
    def _check_targets(self) -> LoadtestSettings:
        if len(set(self.protocols)) != len(self.protocols):
            raise ValueError(f"protocols lists one twice: {self.protocols}")
        for protocol in self.protocols:
            url = self.grpc_url if protocol == "grpc" else self.http_url
            if not url:
                raise ValueError(f"protocol {protocol!r} needs {protocol}_url (host:port of Triton's endpoint)")
            _require_loopback(url, protocol)
        return self


@dataclass(frozen=True)
class FailureCount:
    """One distinct error message of failed requests and how often it occurred."""

    name: str  # the request name, e.g. "grpc infer"
    error: str
    occurrences: int


@dataclass(frozen=True)
class LoadtestResult:
    """Locust's figures for all traffic and per protocol, the SLO checks, and where the reports are."""

    settings: LoadtestSettings
    aggregate: RequestStats
    per_protocol: dict[ProtocolName, RequestStats]
    checks: list[SLOCheck]
    errors: list[FailureCount]  # most frequent first
    stats_csv: Path
    html_report: Path
    log_path: Path

    @property
    def passed(self) -> bool:
        """Requests were made and every SLO check passed."""
        return self.aggregate.requests > 0 and all(c.passed for c in self.checks)


def run_loadtest(settings: LoadtestSettings) -> LoadtestResult:
    """Run Locust headless for `settings.duration_s`, then read its CSV and check the SLO on all traffic.

    Requests are built from `settings.signature`, else from the signature Triton publishes for the model
    (ScoringError when it cannot be read); rows that do not fit it raise RowsFileError before Locust starts.
    Raises LocustRunError when Locust exits non-zero (request failures alone do not), overruns
    `duration_s + grace_s` (its process group is then killed), or writes no statistics.
    """
    rows = load_rows(settings.rows_path)  # fail here, not inside Locust
    signature = settings.signature or _served_signature(settings)
    try:
        conform(signature, rows)
    except ScoringError as exc:
        raise RowsFileError(f"rows {settings.rows_path} do not fit model {settings.model!r}: {exc}") from None
    out_dir = settings.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix, html, log_path = out_dir / "locust", out_dir / "report.html", out_dir / "locust.log"
    stats_csv = Path(f"{prefix}_stats.csv")
    for stale in (stats_csv, html):
        stale.unlink(missing_ok=True)

    command = locust_command(settings, prefix, html)
    limit_s = settings.duration_s + settings.grace_s
    log.info("load test: %s (log: %s)", " ".join(command), log_path)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            command, cwd=out_dir, env=_locust_env(settings, signature), stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        rc: int | None = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        _stop_group(proc)
    if rc is None:
        raise LocustRunError(
            f"Locust did not finish within {limit_s:g}s (duration {settings.duration_s}s + grace "
            f"{settings.grace_s:g}s) and was killed; raise grace_s or see {log_path}:\n{_tail(log_path)}"
        )
    if rc != 0:
        raise LocustRunError(f"Locust exited with code {rc}; last lines of {log_path}:\n{_tail(log_path)}")

    aggregate, per_protocol = read_stats(stats_csv, settings.protocols)
    errors = read_failures(Path(f"{prefix}_failures.csv"))
    checks = settings.slo.evaluate(aggregate)
    log.info("load test done: %d requests, %d failures, %.0f req/s", aggregate.requests, aggregate.failures, aggregate.rps)
    return LoadtestResult(settings, aggregate, per_protocol, checks, errors, stats_csv, html, log_path)


def _served_signature(settings: LoadtestSettings) -> ServedSignature:
    protocol = settings.protocols[0]
    url = settings.grpc_url if protocol == "grpc" else settings.http_url
    signature = read_signature(url or "", settings.model, protocol, timeout_s=settings.request_timeout_s)
    log.info("model %r serves %s", settings.model, signature.describe())
    return signature


def locust_command(settings: LoadtestSettings, csv_prefix: Path, html: Path) -> list[str]:
    """The Locust command line for `settings` (user classes chosen by name)."""
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(settings.users), "-r", f"{settings.spawn_rate or settings.users:g}", "-t", f"{settings.duration_s}s",
        "--csv", str(csv_prefix), "--html", str(html), "--only-summary",
        "--exit-code-on-error", "0",  # failed requests are the SLO's to judge; non-zero means Locust broke
    ]
    if "http" in settings.protocols:
        command += ["--host", f"http://{settings.http_url}"]
    return command + [USER_CLASSES[p] for p in settings.protocols]


def read_stats(stats_csv: Path, protocols: tuple[ProtocolName, ...]) -> tuple[RequestStats, dict[ProtocolName, RequestStats]]:
    """The "Aggregated" row and each protocol's row of Locust's `<prefix>_stats.csv`."""
    try:
        with open(stats_csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise LocustRunError(f"Locust wrote no statistics to {stats_csv}; see locust.log next to it") from None
    try:
        by_name = {(row["Type"], row["Name"]): _request_stats(row) for row in rows}
    except (KeyError, ValueError) as exc:
        raise LocustRunError(f"unexpected format in {stats_csv}: {exc!r}; is Locust 2.x installed?") from exc
    aggregate = by_name.get(("", "Aggregated"), NO_REQUESTS)
    names = {name: stats for (_, name), stats in by_name.items()}
    return aggregate, {p: names.get(REQUEST_NAMES[p], NO_REQUESTS) for p in protocols}


def read_failures(failures_csv: Path) -> list[FailureCount]:
    """Locust's `<prefix>_failures.csv`: each distinct error with its count, most frequent first (none: [])."""
    try:
        with open(failures_csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    try:
        errors = [FailureCount(row["Name"], _message(row["Error"]), int(row["Occurrences"])) for row in rows]
    except (KeyError, ValueError) as exc:
        raise LocustRunError(f"unexpected format in {failures_csv}: {exc!r}; is Locust 2.x installed?") from exc
    return sorted(errors, key=lambda e: -e.occurrences)


def _message(error: str) -> str:
    """The message inside Locust's repr of the exception (`RequestFailedError('StatusCode.X: ...')`)."""
    match = _EXCEPTION_REPR.match(error)
    return match.group(2) if match else error


def render_verdict(result: LoadtestResult) -> str:
    """A readable summary: traffic per protocol, then each SLO with budget, measurement and PASS/FAIL."""
    s = result.settings
    lines = [
        f"load test of {s.model!r}: {s.users} users, {s.duration_s}s, {'+'.join(s.protocols)}",
        f"{'traffic':<10}{'requests':>10}{'failures':>10}{'req/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}",
    ]
    rows = [*result.per_protocol.items(), ("all", result.aggregate)]
    for name, st in rows:
        lines.append(
            f"{name:<10}{st.requests:>10}{st.failures:>10}{st.rps:>10.1f}"
            f"{_fmt(st.p50_ms):>9}{_fmt(st.p95_ms):>9}{_fmt(st.p99_ms):>9}"
        )
    lines.append(f"{'SLO (all traffic)':<18}{'budget':>12}{'measured':>12}  result")
    for c in result.checks:
        lines.append(f"{c.name:<18}{c.op + ' ' + _fmt(c.budget):>12}{_fmt(c.measured):>12}  {'PASS' if c.passed else 'FAIL'}")
    if result.errors:
        shown = result.errors[:SHOWN_ERRORS]
        lines.append(f"failed requests, {len(shown)} of {len(result.errors)} distinct errors:")
        for e in shown:
            text = e.error if len(e.error) <= ERROR_CHARS else e.error[:ERROR_CHARS] + "..."
            lines.append(f"  {e.occurrences} x {e.name}: {text}")
    if result.aggregate.requests == 0:
        lines.append(f"no requests were recorded; see {result.log_path}")
    lines.append(f"verdict: {'PASS' if result.passed else 'FAIL'}  (reports: {result.stats_csv}, {result.html_report})")
    return "\n".join(lines)


def _request_stats(row: dict[str, str]) -> RequestStats:
    return RequestStats(
        requests=int(row["Request Count"]), failures=int(row["Failure Count"]), rps=float(row["Requests/s"]),
        p50_ms=_ms(row["50%"]), p95_ms=_ms(row["95%"]), p99_ms=_ms(row["99%"]),
    )


def _ms(value: str) -> float | None:
    return None if value == "N/A" else float(value)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _require_loopback(url: str, protocol: str) -> None:
    parts = urlsplit(url if "//" in url else f"//{url}")
    if parts.scheme not in ("", "http"):
        raise ValueError(f"{protocol}_url {url!r}: give host:port (plain HTTP/gRPC only)")
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or parts.port is None:
        raise ValueError(f"{protocol}_url {url!r}: load tests only target this machine; use 127.0.0.1:<port>")


def _locust_env(settings: LoadtestSettings, signature: ServedSignature) -> dict[str, str]:
    """This environment without LOCUST_* (which would override our flags) plus the locustfile's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "TREEOPS_LT_"))}
    env[ENV_ROWS] = str(settings.rows_path.resolve())
    env[ENV_SIGNATURE] = json.dumps(signature.to_dict())
    env[ENV_MODEL] = settings.model
    env[ENV_TIMEOUT_S] = str(settings.request_timeout_s)
    if settings.grpc_url and "grpc" in settings.protocols:
        env[ENV_GRPC_URL] = settings.grpc_url
    return env


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM Locust's process group (it writes its reports on the way out), then SIGKILL what is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("Locust ignored SIGTERM for %.0fs; killing it", STOP_GRACE_S)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
