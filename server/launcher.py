"""Start, watch and stop a real tritonserver process."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from backends import prediction_log
from server.errors import InsecureAdminError, PortInUseError, TritonStartError, TritonUnhealthyError
from server.installation import TritonInstallation
from server.server_record import ServerRecord, check_stale
from server.settings import (
    ADMIN_KEY_ENV,
    ONLINE_STORE_URL_ENV,
    PREDICTION_LOG_DIR_ENV,
    SupervisionSettings,
    TritonSettings,
)

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: Triton 2.51 logs this once no inference is in flight on shutdown, right before it unloads every model.
UNLOADING_LINE = b"All models are stopped, unloading models"
#: Triton 2.51's load failures: "failed to load 'm' version v: why", then "failed to load 'm'" once no version loaded.
FAILED_TO_LOAD = "failed to load "
FAILED_MODEL_LINE = re.compile(FAILED_TO_LOAD + r"'([^']+)'\"")
#: Prefix of the shared-memory files the Python backend creates in /dev/shm (one per model instance).
PYTHON_BACKEND_SHM = "/dev/shm/triton_python_backend_shm_region_"
#: How long a graceful stop waits for the Python-backend models' stubs to stop calling Triton (they look every
#: 0.5 s; clients are still answered meanwhile), then for their prediction logs to write what they queued: at most
#: LOG_FLUSH_FROZEN_S with tritonserver frozen (they answer in milliseconds), then, for a stub whose main thread the
#: freeze caught inside a call to Triton (it holds the GIL, so its writer cannot run), LOG_FLUSH_TIMEOUT_S thawed.
LOG_QUIET_TIMEOUT_S = 3.0
LOG_FLUSH_FROZEN_S = 2.0
LOG_FLUSH_TIMEOUT_S = 5.0
#: What the launcher logs when it thaws tritonserver to let a caught stub's writer finish (clients may then see
#: NOT_FOUND until the group is killed, a few milliseconds).
THAWED_FOR_LOG = "thawing tritonserver so they can write"


class TritonServer:
    """One tritonserver process in its own process group (so its stub processes go with it).

    Use as a context manager, or call `start()` and `stop()`. tritonserver is SIGKILLed when the
    thread that called `start()` dies (PR_SET_PDEATHSIG), so a launcher killed with -9 leaves no
    server holding the ports; start it from a thread that lives as long as the server. The pid and
    ports are recorded next to the log (`record_path`) so a later start reports, or stops, a stale one.
    """

    def __init__(self, settings: TritonSettings, installation: TritonInstallation, log_path: Path) -> None:
        if installation.backend_directory is not None and settings.backend_directory is None:
            settings = settings.model_copy(update={"backend_directory": installation.backend_directory})
        self.settings = settings
        self.installation = installation
        self.log_path = log_path
        self.record_path = log_path.with_suffix(".pid.json")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_root: str | None = None  # the prediction log the running server's models write

    @property
    def key_in_environment(self) -> bool:
        """Whether the admin key reaches tritonserver through its environment (the shim) instead of its argv."""
        return self.settings.admin_key is not None and self.installation.admin_key_shim is not None

    @property
    def command(self) -> list[str]:
        return [str(self.installation.binary), *self.settings.to_args(key_placeholder=self.key_in_environment)]

    def environment(self) -> dict[str, str]:
        """tritonserver's environment: the installation's, the online store URL, the prediction log's settings, the
        admin key and its shim."""
        env = self.installation.environment()
        if self.settings.online_store_url is not None:
            env[ONLINE_STORE_URL_ENV] = self.settings.online_store_url
        env.update(self.settings.prediction_log_environment())
        if self.key_in_environment:
            preload = env.get("LD_PRELOAD")
            env["LD_PRELOAD"] = f"{self.installation.admin_key_shim}:{preload}" if preload else str(
                self.installation.admin_key_shim)
            env[ADMIN_KEY_ENV] = self.settings.admin_key.get_secret_value()
        return env

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def served_repository(self) -> str:
        """What this server serves, as its record names it (the resolved local path, or the cloud URI)."""
        return self.settings.model_repository_uri or str(Path(self.settings.model_repository).resolve())

    def start(self, timeout_s: float = 60.0, models: Iterable[str] = ()) -> TritonServer:
        """Start tritonserver and wait until it (and `models`) are ready, or raise TritonStartError."""
        s = self.settings
        _check_admin_surface(s, key_on_command_line=not self.key_in_environment)
        check_stale(self.record_path, self.served_repository, stop_timeout_s=s.exit_timeout_s + 10)
        ports = {"gRPC": s.grpc_port, "HTTP": s.http_port, "metrics": s.metrics_port}
        ensure_ports_free(s.host, ports)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")
        log_offset = log_file.tell()
        env = self.environment()
        self._log_root = env.get(PREDICTION_LOG_DIR_ENV) or None
        log.info("starting %s %s (log: %s)", self.installation.binary, " ".join(s.to_args(redact=True)), self.log_path)
        try:
            self._proc = subprocess.Popen(
                self.command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with(os.getpid()),
            )
        finally:
            log_file.close()
        ServerRecord(self._proc.pid, os.getpid(), ports, self.served_repository).write(self.record_path)
        try:
            self.wait_ready(timeout_s, models, log_offset=log_offset)
        except BaseException:
            self.stop()
            raise
        log.info("Triton ready: gRPC %s, HTTP %s, metrics %s", s.grpc_url, s.http_url, s.metrics_url)
        return self

    def wait_ready(self, timeout_s: float, models: Iterable[str] = (), log_offset: int | None = None) -> None:
        """Poll `/v2/health/ready` and each model's ready endpoint until all answer 200.

        With `log_offset` (where this server's lines start in its log), a model Triton logs as failed to load
        raises at once, with its error lines, instead of at the timeout.
        """
        models = list(models)
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise TritonStartError(
                    f"tritonserver {describe_exit(self._proc.returncode)} during start-up; "
                    f"last log lines:\n{self.log_tail()}"
                )
            if all(self._http_ok(p) for p in paths):
                return
            failed = self._failed_to_load(models, log_offset)
            if failed:
                raise TritonStartError(f"Triton could not load {', '.join(map(repr, failed))}; its errors:\n"
                                       + self._load_errors(failed, log_offset))
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"Triton was not ready after {timeout_s:.0f}s ({', '.join(paths)}); last log lines:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _failed_to_load(self, models: list[str], log_offset: int | None) -> list[str]:
        """Models Triton gave up on (its model-level line, logged once no version loaded) that keep this start from
        being ready: those in `models`, or any one with strict readiness (the server is then never ready)."""
        if log_offset is None:
            return []
        failed = re.findall(FAILED_MODEL_LINE, self._log_since(log_offset))
        return sorted({m for m in failed if m in models or self.settings.strict_readiness})

    def _load_errors(self, models: list[str], log_offset: int | None) -> str:
        lines = self._log_since(log_offset or 0).splitlines()
        return "\n".join(line for line in lines if any(f"{FAILED_TO_LOAD}'{m}'" in line for m in models))

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> int:
        """Block until the server exits; returns its exit code."""
        if self._proc is None:
            return 0
        return self._proc.wait()

    def supervise(self, supervision: SupervisionSettings) -> None:
        """Block while Triton runs and answers `/v2/health/live`.

        Returns when tritonserver exits with code 0; raises TritonUnhealthyError (after stopping it) when it
        exits otherwise or fails `liveness_failures` checks in a row, e.g. stopped (SIGSTOP) or wedged.
        """
        proc = self._proc
        if proc is None:
            return
        failures = 0
        while True:
            try:
                code = proc.wait(timeout=supervision.liveness_interval_s)
            except subprocess.TimeoutExpired:
                code = None
            if code == 0:
                log.info("tritonserver pid %d exited with code 0", proc.pid)
                return
            if code is not None:
                self.stop()
                raise TritonUnhealthyError(
                    f"tritonserver pid {proc.pid} {describe_exit(code)}; see {self.log_path}:\n{self.log_tail(10)}"
                )
            problem = self._liveness_problem(supervision.liveness_timeout_s)
            failures = failures + 1 if problem else 0
            if problem:
                log.warning("liveness check %d/%d of tritonserver pid %d failed: %s",
                            failures, supervision.liveness_failures, proc.pid, problem)
            if failures >= supervision.liveness_failures:
                self.stop(graceful=False)
                raise TritonUnhealthyError(
                    f"tritonserver pid {proc.pid} failed {failures} liveness checks in a row "
                    f"(http://{self.settings.http_url}/v2/health/live: {problem}), so it was killed; "
                    f"see {self.log_path}; tune TREEOPS_SERVE_LIVENESS_INTERVAL_S / _FAILURES"
                )

    def stop(self, graceful: bool = True) -> None:
        """Stop Triton so that clients see UNAVAILABLE, not NOT_FOUND; then SIGKILL its whole process group.

        Graceful: SIGTERM makes Triton wait (up to `exit_timeout_s`) for in-flight inferences; once none is left it
        unloads every model but keeps its ports open for up to a second more, answering NOT_FOUND "no available
        versions". At its log line saying so the launcher freezes tritonserver (SIGSTOP: a request arriving now waits
        and then gets UNAVAILABLE), has every prediction-log writer write what it queued (the stubs are not frozen;
        bounded by LOG_FLUSH_FROZEN_S, then thawed: see `_flush_prediction_logs`), then kills the group: no answered
        request is missing from the log. Triton
        logs that line just after it began unloading, so a request arriving in the launcher's reaction time (about
        1-2 ms here) can still get NOT_FOUND. With a prediction log, the stubs first stop their metrics calls
        (`LOG_QUIET_TIMEOUT_S`, about 0.5 s; clients are still answered). Not graceful (a wedged server): SIGKILL
        at once; the log loses at most its last flush interval.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        ours = proc.poll() is None
        regions = _shared_memory_regions(proc.pid)
        if ours and graceful:
            self._quiet_prediction_logs(proc)
            log_offset = self._log_size()
            proc.send_signal(signal.SIGTERM)
            if not self._await_unload(proc, log_offset, timeout_s=self.settings.exit_timeout_s + 10):
                log.warning("tritonserver did not finish its in-flight requests in time; killing it")
            self._flush_prediction_logs(proc)
        _kill_group(proc.pid)
        proc.wait()
        _await_group_gone(proc.pid, timeout_s=5)
        for region in regions:  # what the killed unload did not get to remove
            region.unlink(missing_ok=True)
        self.record_path.unlink(missing_ok=True)
        if self._log_root is not None:
            prediction_log.clear_handshakes(self._log_root)
        if ours or proc.returncode == 0:
            log.info("Triton stopped")
        else:
            log.error("tritonserver pid %d %s", proc.pid, describe_exit(proc.returncode))

    def _quiet_prediction_logs(self, proc: subprocess.Popen[bytes]) -> None:
        """Have the stubs stop calling Triton, so that freezing it cannot leave one waiting on it."""
        if self._log_root is None:
            return
        unanswered = prediction_log.quiet_all(self._log_root, proc.pid, LOG_QUIET_TIMEOUT_S)
        if unanswered:
            log.warning("%d Python-backend stub(s) did not stop their metrics calls within %.0fs (%s); stopping anyway",
                        len(unanswered), LOG_QUIET_TIMEOUT_S, ", ".join(unanswered))

    def _flush_prediction_logs(self, proc: subprocess.Popen[bytes]) -> None:
        """Freeze tritonserver and wait until every prediction-log writer of its models wrote what it queued.

        A stub caught by the freeze inside a call to Triton holds its GIL, so its writer cannot run: after
        LOG_FLUSH_FROZEN_S tritonserver is thawed (it goes on unloading; a request arriving now may get NOT_FOUND)
        until those writers answered, since a lost record is worse than a NOT_FOUND.
        """
        if self._log_root is None:
            return
        proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        unanswered = prediction_log.flush_all(self._log_root, proc.pid, LOG_FLUSH_FROZEN_S)
        if unanswered:
            log.warning("%d prediction-log writer(s) did not answer within %.0fs of freezing tritonserver (%s); %s "
                        "(clients may see NOT_FOUND until it is killed)", len(unanswered), LOG_FLUSH_FROZEN_S,
                        ", ".join(unanswered), THAWED_FOR_LOG)
            proc.send_signal(signal.SIGCONT)
            unanswered = prediction_log.flush_all(self._log_root, proc.pid, LOG_FLUSH_TIMEOUT_S)
        if unanswered:
            log.error("%d prediction-log writer(s) did not write their queued records within %.0fs, so the last "
                      "records of those models may be missing from %s: %s (see %s for the writers' errors)",
                      len(unanswered), LOG_FLUSH_TIMEOUT_S, self._log_root, ", ".join(unanswered), self.log_path)
        else:
            log.info("prediction logs written in %.3fs", time.monotonic() - started)

    def _await_unload(self, proc: subprocess.Popen[bytes], log_offset: int, timeout_s: float) -> bool:
        """Wait until tritonserver exits or logs UNLOADING_LINE after `log_offset`; False on timeout."""
        deadline = time.monotonic() + timeout_s
        seen = b""
        with open(self.log_path, "rb") as log_file:
            log_file.seek(log_offset)
            while time.monotonic() < deadline:
                seen = seen[-len(UNLOADING_LINE):] + log_file.read()
                if UNLOADING_LINE in seen or proc.poll() is not None:
                    return True
                time.sleep(0.002)
        return False

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _liveness_problem(self, timeout_s: float) -> str | None:
        """None when `/v2/health/live` answers 200 within `timeout_s`, else what went wrong."""
        url = f"http://{self.settings.http_url}/v2/health/live"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                return None if resp.status == 200 else f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"no answer within {timeout_s:g}s" if isinstance(reason, TimeoutError) else str(reason)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _http_ok(self, path: str) -> bool:
        url = f"http://{self.settings.http_url}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def __enter__(self) -> TritonServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_ports_free(host: str, ports: dict[str, int]) -> None:
    """Raise PortInUseError naming every taken port and how to choose others."""
    taken = []
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                taken.append(f"{name} port {port}")
    if taken:
        raise PortInUseError(
            f"{', '.join(taken)} already in use on {host}: stop the process holding it "
            "(is another Triton running?) or pick free ports with --grpc-port/--http-port/--metrics-port"
        )


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def describe_exit(code: int) -> str:
    """'exited with code 3' or 'was killed by SIGKILL' for a Popen return code."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _check_admin_surface(settings: TritonSettings, key_on_command_line: bool) -> None:
    """Refuse to start with every admin API open unless asked to; warn when asked to, or when others can read the key."""
    if settings.admin_key is not None:
        if key_on_command_line and not _proc_hides_other_users():
            log.warning("the admin key is on tritonserver's command line (no C compiler for server/admin_key_shim.c): "
                        "other users of this machine can read /proc/<pid>/cmdline unless /proc is mounted hidepid=2")
        return
    if not settings.insecure_admin:
        raise InsecureAdminError(
            f"no admin key: Triton's admin APIs ({', '.join(settings.admin_apis)}) would let anyone who reaches "
            f"gRPC {settings.grpc_url} or HTTP {settings.http_url} unload models; set {ADMIN_KEY_ENV} "
            "(`openssl rand -hex 32`) or pass --insecure-admin to run them open"
        )
    log.warning("admin APIs are open without a key (--insecure-admin): anyone who reaches gRPC %s or HTTP %s "
                "can load and unload models", settings.grpc_url, settings.http_url)


def _proc_hides_other_users(mounts: Path = Path("/proc/mounts")) -> bool:
    """Whether /proc is mounted with hidepid (2/invisible or 1/noaccess), hiding other users' command lines."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[1] == "/proc" and fields[2] == "proc":
            options = dict(o.partition("=")[::2] for o in fields[3].split(","))
            return options.get("hidepid", "0") not in {"0", "off"}
    return False


def _await_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no process of group `pgid` is left, not even a zombie (killed stubs wait for init to reap them)."""
    deadline = time.monotonic() + timeout_s
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                members.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return members


def _shared_memory_regions(pid: int) -> set[Path]:
    """The Python backend's /dev/shm regions that tritonserver `pid` has mapped (empty once it is gone)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    paths = (line.split(maxsplit=5)[-1] for line in maps.splitlines() if PYTHON_BACKEND_SHM in line)
    return {Path(p) for p in paths if not p.endswith(" (deleted)")}


def _die_with(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn that makes the child receive SIGKILL when the thread that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
