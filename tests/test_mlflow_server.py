"""Against a real MLflow tracking server (not the embedded SQLite): train, register, export."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from server.launcher import free_port
from training.generate import GenerateSpec, generate_transactions, write_transactions

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_train_and_export_through_a_tracking_server(mlflow_server, tmp_path, treeops):
    url, server_root = mlflow_server
    data = write_transactions(generate_transactions(GenerateSpec(rows=8_000, seed=12)), tmp_path / "t.parquet")
    trained = treeops("train", "--data", str(data), "--max-rounds", "20", workspace=tmp_path, mlflow_uri=url)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
    assert list((server_root / "artifacts").rglob("feature_spec.json"))
    exported = treeops("export", workspace=tmp_path, mlflow_uri=url)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (tmp_path / "model_repository" / "fraud" / "1" / "forest.so").exists()
    listed = treeops("models", workspace=tmp_path, mlflow_uri=url)
    assert listed.returncode == 0 and "champion" in listed.stdout
