"""Promotion, rollback and sync on a live Triton under steady gRPC load: zero failed requests."""

from __future__ import annotations

import time
from collections import Counter

import mlflow
import pytest

from export.pipeline import export_model
from registry.promotion import AuditLog, promote, rollback
from export.repository import ModelRepository
from registry.sync import SyncSettings
from server.admin import AdminClient
from server.client import ScoringClient, load_features
from registry.rollout import RolloutError, rollout
from training.generate import GenerateSpec, generate_transactions, write_transactions
from training.pipeline import train_and_register
from training.train import TrainParams
from treeops.workspace import Workspace
from steady_load import SteadyLoad
from triton_fixtures import serving

pytestmark = [pytest.mark.triton, pytest.mark.slow]
MODEL = "fraud"
ADMIN_KEY = "test-admin-key-0123456789"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Workspace with v1 (champion, exported) and v2 (challenger), and a Triton with an admin key."""
    before = mlflow.get_tracking_uri()
    ws = Workspace(tmp_path_factory.mktemp("live"))
    data = write_transactions(generate_transactions(GenerateSpec(rows=12_000, seed=21)), ws.data_dir / "t.parquet")
    for rounds in (40, 15):
        train_and_register(data, "is_fraud", MODEL, params=TrainParams(num_boost_round=rounds),
                           tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)
    mlflow.set_tracking_uri(ws.tracking_uri)
    repo = ModelRepository(ws.model_repository)
    export_model(MODEL, repo)
    features = load_features(repo.version_dir(MODEL, 1))
    rows = features.matrix_raw(generate_transactions(GenerateSpec(rows=300, seed=5)))
    try:
        with (serving(ws, models=[MODEL], exit_timeout_s=5, admin_key=ADMIN_KEY) as server,
              AdminClient(server.settings.grpc_url, ADMIN_KEY) as admin):
            yield ws, repo, server, admin, rows
    finally:
        mlflow.set_tracking_uri(before)


def _wait_for_version(load: SteadyLoad, version: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while load.latest_version() != version:
        assert time.monotonic() < deadline, f"answers never came from version {version}"
        time.sleep(0.05)


def test_promote_and_rollback_under_load_lose_nothing(live):
    ws, repo, server, admin, rows = live
    audit = AuditLog(ws.audit_log)
    with SteadyLoad(server.settings.grpc_url, rows) as load:
        time.sleep(1.0)
        assert load.latest_version() == "1"
        promote(MODEL, repo, audit, force=True, reason="zero-downtime drill")
        result = rollout(MODEL, repo, admin, SyncSettings(retain_versions=5))
        assert result.served == (2,)
        _wait_for_version(load, "2")
        time.sleep(0.5)
        rollback(MODEL, audit, reason="drill done")
        assert rollout(MODEL, repo, admin, SyncSettings(retain_versions=5)).served == (1,)
        _wait_for_version(load, "1")
        time.sleep(0.5)
    assert load.failures == [], load.failures[:5]
    seen = [v for _, v in load.versions]
    assert load.ok > 200
    # Answers switch 1 -> 2 -> 1, never interleaving back once the switch is done.
    changes = [seen[0]] + [b for a, b in zip(seen, seen[1:]) if a != b]
    assert changes[0] == "1" and "2" in changes and changes[-1] == "1"
    assert Counter(seen)["2"] > 0


def test_failed_load_keeps_the_old_version_serving(live):
    ws, repo, server, admin, rows = live
    data = ws.data_dir / "t.parquet"
    train_and_register(data, "is_fraud", MODEL, params=TrainParams(num_boost_round=10),
                       tracking_uri=ws.tracking_uri, artifact_root=ws.artifact_root)  # v3, challenger
    mlflow.set_tracking_uri(ws.tracking_uri)
    served_before = repo.read_config(MODEL)
    audit = AuditLog(ws.audit_log)
    promote(MODEL, repo, audit, force=True, reason="will fail to load")  # exports v3 through the gate
    (repo.version_dir(MODEL, 3) / "forest.so").write_bytes(b"corrupted after the parity gate")
    with SteadyLoad(server.settings.grpc_url, rows) as load:
        time.sleep(0.5)
        with pytest.raises(RolloutError, match="previous config was restored"):
            rollout(MODEL, repo, admin, SyncSettings(retain_versions=5), timeout_s=30)
        time.sleep(1.0)
    assert load.failures == [], load.failures[:5]
    assert {v for _, v in load.versions} == {"1"}
    assert repo.read_config(MODEL) == served_before
    assert admin.model_ready(MODEL, 1)
    rollback(MODEL, audit, reason="v3 failed to load")


def test_sync_prunes_versions_without_alias_on_a_live_server(live):
    _, repo, server, admin, rows = live
    assert set(repo.versions(MODEL)) >= {1, 2, 3}
    result = rollout(MODEL, repo, admin, SyncSettings(retain_versions=0))
    assert result.served == (1,)
    assert set(result.pruned) == {2, 3}
    assert repo.versions(MODEL) == [1]
    with ScoringClient(server.settings.grpc_url, MODEL, retries=0) as client:
        assert client.score(rows[:4]).model_version == "1"

