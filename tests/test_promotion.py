"""Gated promotion, forced promotion, rollback, audit trail and an idempotent sync, through the CLI."""

from __future__ import annotations

import json

import pytest

from training.generate import GenerateSpec, generate_transactions, write_transactions


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, treeops):
    """v1: a proper model (champion); v2: a one-tree model (challenger) that should not win."""
    ws = tmp_path_factory.mktemp("promote")
    data = write_transactions(generate_transactions(GenerateSpec(rows=20_000, seed=4)), ws / "data" / "train.parquet")
    for rounds in ("60", "1"):
        out = treeops("train", "--data", str(data), "--max-rounds", rounds, "--json", workspace=ws)
        assert out.returncode == 0, out.stderr
    out = treeops("export", workspace=ws)
    assert out.returncode == 0, out.stderr
    return ws


def _aliases(treeops, ws) -> dict:
    out = treeops("models", "--json", workspace=ws)
    assert out.returncode == 0, out.stderr
    return {r["version"]: r["aliases"] for r in json.loads(out.stdout)["versions"]}


def test_promotion_lifecycle(two_versions, treeops):
    ws = two_versions
    assert _aliases(treeops, ws) == {2: ["challenger"], 1: ["champion"]}

    refused = treeops("promote", "--margin", "0.0", workspace=ws)
    assert refused.returncode == 1
    assert "challenger version 2 does not beat champion version 1 on roc_auc" in refused.stderr
    assert _aliases(treeops, ws) == {2: ["challenger"], 1: ["champion"]}
    assert not (ws / "audit" / "registry.jsonl").exists()

    forced = treeops("promote", "--force", "--reason", "drill", "--json", workspace=ws)
    assert forced.returncode == 0, forced.stderr
    body = json.loads(forced.stdout)
    assert body["event"]["forced"] is True and body["event"]["reason"] == "drill"
    assert body["sync"]["served"] == [2]
    assert _aliases(treeops, ws) == {2: ["champion"], 1: []}
    config = (ws / "model_repository" / "fraud" / "config.pbtxt").read_text()
    assert "versions: 2" in config and '"champion_version"' in config

    back = treeops("rollback", "--reason", "bad night", "--json", workspace=ws)
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["sync"]["served"] == [1]
    assert _aliases(treeops, ws) == {2: [], 1: ["champion"]}

    audit = [json.loads(line) for line in (ws / "audit" / "registry.jsonl").read_text().splitlines()]
    assert [(a["event"], a["from_version"], a["to_version"]) for a in audit] == [("promote", 1, 2), ("rollback", 2, 1)]
    assert audit[0]["metrics"]["champion"]["roc_auc"] > audit[0]["metrics"]["challenger"]["roc_auc"]
    assert all(a["actor"] and a["at"] for a in audit)

    again = treeops("rollback", workspace=ws)
    assert again.returncode == 1 and "no previous champion" in again.stderr


def test_sync_is_idempotent(two_versions, treeops):
    first = treeops("sync", "--json", workspace=two_versions)
    assert first.returncode == 0, first.stderr
    second = json.loads(treeops("sync", "--json", workspace=two_versions).stdout)
    assert second["exported"] == [] and second["config_changed"] is False
