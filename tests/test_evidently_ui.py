"""Two `treeops monitor` windows in the real `evidently ui`, rendered by headless Chromium.

The UI is a React app fed by a JSON API; `chromium --headless --dump-dom` with a virtual-time budget runs it until
its requests settle and prints the rendered DOM. The dashboard must show every panel the monitor's project
declares, each with its legends, one line per series and one point per window; the Reports page must list every
snapshot the windows added. A screenshot of the dashboard is saved in the test's tmp folder (path printed).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import polars as pl
import pytest

from bench.monitor import log_predictions
from export.parity import reference_scores
from monitoring.labels import LABELLED_AT, SCHEMA, ingest_labels
from monitoring.monitor import MonitorPaths, run_monitor
from registry import versions as registry
from server.launcher import free_port
from training.generate import GenerateSpec, generate_transactions
from triton_fixtures import MODEL

pytestmark = pytest.mark.slow

EVIDENTLY = str(Path(sys.executable).parent / "evidently")
CHROMIUM_INSTALL = "install Debian's chromium (`make test` does it; by hand: apt-get install -y chromium)"
#: The ends of the two monitored hours; the second hour's traffic is drifted, so the drift line rises.
ENDS = (dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC), dt.datetime(2026, 3, 1, 13, tzinfo=dt.UTC))
RUN_NAMES = ("drift v1 2026-03-01 11:00..12:00", "quality v1 2026-03-01 11:00..12:00",
             "drift v1 2026-03-01 12:00..13:00", "quality v1 2026-03-01 12:00..13:00")
RENDER_BUDGET_MS = 15_000  # virtual time Chromium gives the app to fetch and draw
CHROMIUM_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def monitored(trained, tmp_path_factory) -> Path:
    """A workspace holding the trained version and two monitored hours of its logged, labelled traffic."""
    root = tmp_path_factory.mktemp("monitored")
    shutil.copytree(trained.repository.model_dir(MODEL), root / "model_repository" / MODEL)
    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    bundle = registry.load_bundle(registry.resolve(MODEL, alias="champion"), root / "bundle")
    paths = MonitorPaths.in_workspace(root, MODEL)
    for hour, end in enumerate(ENDS):
        raw = generate_transactions(GenerateSpec(rows=1000, seed=11 + hour, drift=float(hour)))
        x = bundle.fitted.matrix_raw(raw)
        ids = raw["transaction_id"].cast(pl.String)
        log_predictions(paths.log_root, bundle.fitted.spec.names, x, reference_scores(bundle.booster, x)[:, -1],
                        ids.to_list(), version=bundle.ref.version, end=end)
        labels = root / f"labels-{hour}.parquet"
        pl.DataFrame({"transaction_id": ids, "label": raw["is_fraud"].cast(pl.Int8), LABELLED_AT: [end] * len(ids)},
                     schema=SCHEMA).write_parquet(labels)
        ingest_labels(labels, paths.labels_dir, ids)
        result = run_monitor(MODEL, end - dt.timedelta(hours=1), end, paths)
        assert result.versions[0].quality is not None and result.versions[0].drift is not None
    return paths.evidently_workspace


def _stop_group(proc: subprocess.Popen[bytes], what: str, log: Path | None = None) -> None:
    """SIGTERM `proc`'s process group, SIGKILL it after 10 s; fail if any process of the group is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{what} ignored SIGTERM for 10 s" + (f" (log {log})" if log else ""))
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid):
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"processes of {what}'s group {proc.pid} outlived it by 10 s (now killed)")
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def evidently_ui(workspace: Path, log: Path, timeout_s: float = 60) -> Iterator[str]:
    """The real `evidently ui` on a free loopback port serving `workspace`; yields its base URL, stops it after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([EVIDENTLY, "ui", "--workspace", str(workspace), "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(f"{url}/api/version"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"evidently ui not serving {url} after {timeout_s:g} s (exit {proc.poll()}): "
                            f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.25)
        yield url
    finally:
        _stop_group(proc, "evidently ui", log)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def chromium(url: str, profile: Path, *args: str) -> str:
    """Headless Chromium loads `url`, runs its scripts for RENDER_BUDGET_MS of virtual time and performs `args`
    (e.g. --dump-dom, --screenshot=PATH); returns its stdout. Every Chromium process is gone when it returns."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail(f"chromium is not on PATH: {CHROMIUM_INSTALL}")
    proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--user-data-dir={profile}", f"--virtual-time-budget={RENDER_BUDGET_MS}", *args, url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish {url} in {CHROMIUM_TIMEOUT_S} s")
    finally:
        _stop_group(proc, "chromium")
    assert proc.returncode == 0, f"chromium exited {proc.returncode} on {url}: {err.decode(errors='replace')[-2000:]}"
    return out.decode()


@dataclass(frozen=True)
class Rendered:
    """What a dumped DOM shows: its visible text pieces and how many chart lines and points it draws."""

    texts: frozenset[str]
    lines: int
    points: int

    @classmethod
    def of(cls, dom: str) -> Rendered:
        body = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
        texts = frozenset(t.strip() for t in re.split(r"<[^>]*>", body) if t.strip())
        return cls(texts, len(re.findall(r'class="MuiLineElement-root\b', dom)),
                   len(re.findall(r'class="MuiMarkElement-root\b', dom)))


def project_id(url: str, name: str) -> str:
    """The id of project `name` as the UI's own API lists it; fails naming the projects it has."""
    with urllib.request.urlopen(f"{url}/api/projects", timeout=10) as resp:
        projects = json.load(resp)
    found = [p["id"] for p in projects if p["name"] == name]
    assert found, f"evidently ui at {url} has no project {name!r}; it has {[p['name'] for p in projects]}"
    return found[0]


def test_monitor_windows_render_in_evidently_ui(monitored, tmp_path):
    from evidently.ui.workspace import Workspace

    found = Workspace(str(monitored)).search_project(f"treeops {MODEL}")
    assert found, f"the monitor wrote no project 'treeops {MODEL}' into {monitored}"
    project = found[0]
    panels = {p.title: [v.legend for v in p.values] for p in project.dashboard.model().panels}
    series = sum(len(legends) for legends in panels.values())
    assert len(panels) == 2 and series == 6, panels

    with evidently_ui(monitored, tmp_path / "evidently-ui.log") as url:
        dashboard = f"{url}/projects/{project_id(url, project.name)}"
        shown = Rendered.of(chromium(dashboard, tmp_path / "chromium", "--dump-dom"))
        reports = Rendered.of(chromium(f"{dashboard}/reports", tmp_path / "chromium", "--dump-dom"))
        screenshot = tmp_path / "evidently-dashboard.png"
        chromium(dashboard, tmp_path / "chromium", f"--screenshot={screenshot}", "--window-size=1400,1200")

    print(f"\nEvidently dashboard screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000, screenshot
    for title, legends in panels.items():
        assert {title, *legends} <= shown.texts, f"panel {title!r} or its legends {legends} not rendered"
    assert {f"{end:%Y-%m-%d %H:%M:%S}" for end in ENDS} <= shown.texts  # both windows on the time axis
    assert (shown.lines, shown.points) == (series, series * len(ENDS)), "one line per series, one point per window"
    assert set(RUN_NAMES) <= reports.texts, sorted(reports.texts)
