"""The README's raw-transaction examples, run as written against a real Triton and a real Redis.

The fenced blocks between `<!-- raw-examples:start -->` and `<!-- raw-examples:end -->` run in README
order (bash blocks with bash, python blocks with this interpreter, from an empty directory) against the
raw-transaction model of test_online_serving.py served as `fraud`, its store empty at the start. The one
change made to a block: the README's default addresses 127.0.0.1:8000 (HTTP) and 127.0.0.1:8001 (gRPC)
become this test server's free ports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from backends.online_history import connect
from online_store.redis_server import LocalRedis
from redis_fixtures import local_redis
from server.launcher import TritonServer
from test_online_serving import copy_model, export_online
from treeops.workspace import Workspace
from triton_fixtures import serving

pytestmark = [pytest.mark.triton]

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- raw-examples:start -->", "<!-- raw-examples:end -->"
HTTP, GRPC = "127.0.0.1:8000", "127.0.0.1:8001"
MODEL = "fraud"
READ_ONLY = "treeops_read_only"


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of each bash or python fenced block between the markers, in README order."""
    text = README.read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1, f"{README} needs one {START} ... {END} pair"
    section = text[text.index(START) : text.index(END)]
    return re.findall(r"^```(bash|python)\n(.*?)^```$", section, flags=re.S | re.M)


def on_ports(code: str, server: TritonServer) -> str:
    """`code` with the README's default addresses replaced by `server`'s (and nothing else changed)."""
    assert HTTP in code or GRPC in code, f"the example names neither {HTTP} (HTTP) nor {GRPC} (gRPC):\n{code}"
    return code.replace(HTTP, server.settings.http_url).replace(GRPC, server.settings.grpc_url)


def recorded(store_url: str) -> set[bytes]:
    """Every transaction id the store holds (members of each entity's transaction-id zset)."""
    client: redis.Redis = connect(store_url)
    try:
        return {m for key in client.scan_iter(match="*}:t") for m in client.zrange(key, 0, -1)}
    finally:
        client.close()


@dataclass(frozen=True)
class Served:
    server: TritonServer
    store: LocalRedis
    version: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """test_online_serving's raw-transaction model served as `fraud` with a real Redis behind it."""
    exported = export_online(Workspace(tmp_path_factory.mktemp("readme")))
    repository = tmp_path_factory.mktemp("repository")
    copy_model(exported, repository, MODEL)
    with local_redis(tmp_path_factory.mktemp("redis")) as store, serving(
            exported.ws, repository=repository, models=[MODEL], online_store_url=store.url, exit_timeout_s=5) as server:
        yield Served(server, store, exported.version_dir.name)


def test_the_readme_shows_curl_plain_tritonclient_and_scoring_client():
    blocks = readme_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "python", "python"], blocks
    curl, plain, scoring = (code for _, code in blocks)
    assert curl.lstrip().startswith("curl ") and f"http://{HTTP}/v2/models/{MODEL}/infer" in curl
    assert "import tritonclient.grpc" in plain
    assert not re.search(r"^\s*(from|import) (server|export|treeops|backends|training)\b", plain, flags=re.M), plain
    assert "ScoringClient(" in scoring and ".score_transactions(" in scoring
    assert any(READ_ONLY in code for _, code in blocks)


def _run(lang: str, code: str, cwd: Path) -> str:
    command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"README {lang} example exited {done.returncode}:\n{code}\n{done.stderr[-3000:]}"
    return done.stdout


def _check_curl(out: str, version: str) -> None:
    answer = json.loads(out)
    assert "outputs" in answer, f"the curl example got no scores: {answer}"
    assert (answer["model_name"], answer["model_version"]) == (MODEL, version), answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    probabilities = outputs["probabilities"]
    assert probabilities["shape"] == [1, 2] and sum(probabilities["data"]) == pytest.approx(1, abs=1e-6)
    assert outputs["treeops_degraded"]["data"] == [False]


def _check_plain(out: str, version: str) -> None:
    p, answered, degraded = out.split()
    assert 0 <= float(p) <= 1 and answered == version and degraded == "False", out


def _check_scoring(out: str, version: str) -> None:
    found = re.fullmatch(r"\[([0-9.e+\- ]+)\] (\S+) \[([A-Za-z ]+)\]\n", out)
    assert found, out
    positive, degraded = found.group(1).split(), found.group(3).split()
    assert all(0 <= float(p) <= 1 for p in positive) and found.group(2) == version, out
    assert degraded == ["False"] * len(positive), out


def test_the_readme_raw_examples_run_as_written(served: Served, tmp_path: Path):
    connect(served.store.url).flushall()
    for (lang, code), check in zip(readme_blocks(), (_check_curl, _check_plain, _check_scoring), strict=True):
        before = recorded(served.store.url)
        check(_run(lang, on_ports(code, served.server), tmp_path), served.version)
        after = recorded(served.store.url)
        if READ_ONLY in code:
            assert after == before, f"the read-only example changed the store:\n{code}"
        else:
            assert after > before, f"the example recorded no transaction in the store:\n{code}"
