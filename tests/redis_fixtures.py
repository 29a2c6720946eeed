"""The one way tests start a real redis-server: LocalRedis on a free port, stopped at the end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from backends.online_history import connect
from online_store.redis_server import LocalRedis


@contextmanager
def local_redis(directory: Path) -> Iterator[LocalRedis]:
    """A started LocalRedis in `directory`; killed if still running at the end (no leftover process)."""
    server = LocalRedis(directory).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """One real redis-server for a test module; tests keep apart by namespace or flush it."""
    with local_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def store(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    """A fail-fast client of the module's server, emptied before the test."""
    client = connect(redis_server.url)
    client.flushall()
    yield client
    client.close()
