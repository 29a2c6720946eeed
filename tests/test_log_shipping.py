"""The prediction log shipped to S3 (monitoring/log_shipper.py, `treeops log ship`) and read back from `s3://`
(monitoring/prediction_log.py through monitoring/log_store.py), on a real S3 API: moto's standalone server."""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from polars.testing import assert_frame_equal

import test_monitor as monitor
import test_native_prediction_log as native
from backends.prediction_log import PredictionLog, Settings
from conftest import TREEOPS
from monitoring.log_shipper import ship_once
from monitoring.log_store import LogStoreError
from monitoring.prediction_log import JOURNAL_SUFFIX, read_window
from online_store.redis_server import free_port

ALL_TIME = (dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2200, 1, 1, tzinfo=dt.UTC))
BUCKET = "treeops-log"
native_ws, served = native.native_ws, native.served  # module fixtures: a real journal, served by the C backend
bundle, served_workspace = monitor.bundle, monitor.served_workspace  # a workspace with an hour of logged traffic
KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on a free port with an empty BUCKET; stopped at the end."""
    port = free_port()
    out = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    f"moto's S3 server did not start (see {out.name}; `make install` installs moto[server])")
                time.sleep(0.1)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True,
                          access_key=KEYS["AWS_ACCESS_KEY_ID"], secret_key=KEYS["AWS_SECRET_ACCESS_KEY"],
                          region=KEYS["AWS_REGION"]).create_dir(BUCKET)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        out.close()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """`s3://BUCKET/<test name>`, the AWS variables pointing at the moto server (inherited by the CLI)."""
    for key, value in {**KEYS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    return f"s3://{BUCKET}/{request.node.name}"


def _record_ends(data: bytes) -> list[int]:
    """The offsets where a journal's records end (its format: monitoring/prediction_log.py)."""
    offset = 20 + struct.unpack_from("<I", data, 12)[0]  # magic, format, JSON length, CRC-32, then the JSON
    ends = []
    while offset < len(data):
        offset += 8 + struct.unpack_from("<I", data, offset)[0]
        ends.append(offset)
    return ends


def _local_log(root: Path, served: dict) -> tuple[Path, bytes]:
    """Three Parquet segments of model "py" (the Python backends' writer) and, of native.MODEL, the first half of a
    real journal (a prefix at a record end, as an open journal is between appends): (the journal, all its bytes)."""
    log = PredictionLog(Settings({"TREEOPS_PREDICTION_LOG_DIR": str(root),
                                  "TREEOPS_PREDICTION_LOG_FLUSH_INTERVAL_S": "60"}), "py", 1, ["a", "b"])
    for i in range(3):
        log.append(f"r{i}", time.time_ns() // 1000, score=np.array([0.1 * i]), features=np.ones((1, 2), np.float32))
        log.flush()
    log.close()
    (source,) = [p for p in Path(served["root"]).rglob(f"*{JOURNAL_SUFFIX}") if f"model={native.MODEL}" in str(p)
                 and b"req-39" in p.read_bytes()]
    journal = root / source.relative_to(served["root"])
    journal.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    ends = _record_ends(data)
    journal.write_bytes(data[:ends[len(ends) // 2]])
    return journal, data


def _same(root: Path | str, other: Path | str, model: str) -> None:
    assert_frame_equal(read_window(root, model, *ALL_TIME), read_window(other, model, *ALL_TIME))


@pytest.mark.triton
def test_shipped_log_reads_the_same_from_s3_and_a_grown_journal_is_reshipped(tmp_path: Path, s3: str, served: dict,
                                                                            caplog: pytest.LogCaptureFixture):
    root = tmp_path / "log"
    journal, whole = _local_log(root, served)
    (journal.parent / ".segment.parquet.tmp").write_bytes(b"PAR1")  # a writer's unfinished segment
    first = ship_once(root, s3)
    assert len(first.uploaded) == 4 and first.bytes == sum(p.stat().st_size for p in root.rglob("*") if
                                                           p.is_file() and not p.name.startswith("."))
    assert not any(k.endswith(".tmp") for k in first.uploaded) and first.failed == ()
    for model in ("py", native.MODEL):
        _same(s3, root, model)
    assert 0 < read_window(s3, native.MODEL, *ALL_TIME).height
    assert ship_once(root, s3).uploaded == ()  # nothing new: nothing uploaded
    journal.write_bytes(whole)  # the journal grew: its object is replaced by the longer prefix
    again = ship_once(root, s3)
    assert again.uploaded == (str(journal.relative_to(root)),) and again.bytes == len(whole)
    assert 0 <= again.lag_s < 120  # since its first upload, moments ago (not an epoch or a monotonic clock)
    _same(s3, root, native.MODEL)
    shipped = read_window(s3, native.MODEL, *ALL_TIME)
    assert "req-39" in shipped["request_id"].to_list()
    journal.write_bytes(whole + whole[_record_ends(whole)[-2]:][:11])  # a pass while a record is being appended
    assert ship_once(root, s3).uploaded == ()  # its whole records are shipped already; the partial one waits
    with caplog.at_level(logging.WARNING, logger="monitoring.prediction_log"):
        assert_frame_equal(read_window(s3, native.MODEL, *ALL_TIME), shipped)
    assert "torn" not in caplog.text


@pytest.mark.triton
def test_a_torn_object_keeps_the_records_before_it_with_a_warning(tmp_path: Path, s3: str, served: dict,
                                                                 caplog: pytest.LogCaptureFixture):
    root = tmp_path / "log"
    journal, whole = _local_log(root, served)
    journal.write_bytes(whole)
    ship_once(root, s3)
    fs, path = pafs.FileSystem.from_uri(s3)
    key = f"{path}/{journal.relative_to(root)}"
    with fs.open_output_stream(key) as out:
        out.write(whole[:-7])  # the last record cut short
    with caplog.at_level(logging.WARNING, logger="monitoring.prediction_log"):
        torn = read_window(s3, native.MODEL, *ALL_TIME)
    assert f"s3://{key} is torn at offset" in caplog.text
    assert torn.height == read_window(root, native.MODEL, *ALL_TIME).height - 1
    assert "req-39" not in torn["request_id"].to_list()


def test_a_missing_bucket_is_named_and_nothing_local_is_deleted(tmp_path: Path, s3: str, treeops):
    root = tmp_path / "log"
    log = PredictionLog(Settings({"TREEOPS_PREDICTION_LOG_DIR": str(root)}), "py", 1, ["a"])
    log.append("r0", time.time_ns() // 1000, score=np.array([0.5]), features=np.ones((1, 1), np.float32))
    log.close()
    before = sorted(root.rglob("*"))
    with pytest.raises(LogStoreError, match="s3://treeops-missing/x"):
        ship_once(root, "s3://treeops-missing/x")
    with pytest.raises(LogStoreError, match="s3://treeops-missing/x"):
        read_window("s3://treeops-missing/x", "py", *ALL_TIME)
    done = treeops("log", "ship", "--to", "s3://treeops-missing/x", "--log-root", str(root), "--once",
                   workspace=tmp_path)
    assert done.returncode == 1 and "s3://treeops-missing/x" in done.stderr, done.stderr
    assert sorted(root.rglob("*")) == before
    ok = treeops("log", "ship", "--to", s3, "--log-root", str(root), "--once", "--json", workspace=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert '"files": 1' in ok.stdout
    _same(s3, root, "py")


def test_interval_shipping_stops_on_sigterm_after_a_last_pass(tmp_path: Path, s3: str):
    root = tmp_path / "log"
    root.mkdir()
    proc = subprocess.Popen([TREEOPS, "log", "ship", "--to", s3, "--log-root",
                             str(root), "--interval", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()  # the first pass: nothing to ship
        assert line.startswith("shipped 0 files"), line + proc.stderr.read()
        log = PredictionLog(Settings({"TREEOPS_PREDICTION_LOG_DIR": str(root)}), "py", 1, ["a"])
        log.append("r0", time.time_ns() // 1000, score=np.array([0.5]), features=np.ones((1, 1), np.float32))
        log.close()  # written while the shipper waits: the last pass ships it
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.startswith("shipped 1 files"), out
    _same(s3, root, "py")


def test_labels_and_monitor_read_the_shipped_log_from_s3(served_workspace: Path, s3: str, treeops):
    ws = served_workspace
    shipped = treeops("log", "ship", "--to", s3, "--once", workspace=ws)  # the workspace's log by default
    assert shipped.returncode == 0, shipped.stderr
    shutil.rmtree(ws / "prediction_log")  # only the bucket holds it now
    done = treeops("labels", "--data", str(ws / "labels.csv"), "--log-root", s3, "--json", workspace=ws)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["unknown_ids"] == 0  # every id found in the bucket's log
    done = treeops("monitor", "--window", "1h", "--end", monitor.END.isoformat(), "--log-root", s3, "--json",
                   workspace=ws)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["exit_code"] == 0 and result["versions"][0]["labelled"] == result["versions"][0]["rows"] > 0


def test_interval_shipping_retries_a_failed_pass(tmp_path: Path, s3_endpoint: str, s3: str):
    root = tmp_path / "log"
    log = PredictionLog(Settings({"TREEOPS_PREDICTION_LOG_DIR": str(root)}), "py", 1, ["a"])
    log.append("r0", time.time_ns() // 1000, score=np.array([0.5]), features=np.ones((1, 1), np.float32))
    log.close()
    bucket = "treeops-later"
    proc = subprocess.Popen([TREEOPS, "log", "ship", "--to", f"s3://{bucket}/log", "--log-root", str(root),
                             "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # the first pass fails: logged, retried
        assert f"s3://{bucket}/log" in line and "does not exist" in line and "retrying" in line, line
        pafs.S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http",
                          allow_bucket_creation=True).create_dir(bucket)
        while not (line := proc.stdout.readline()).startswith("shipped 1 files"):  # a later pass ships it
            assert line, proc.stderr.read()
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    _same(f"s3://{bucket}/log", root, "py")
