"""Which online store (Redis) a served repository's raw-transaction models use, started locally when none is set."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backends.online_history import redacted
from export.online import NAMESPACE_PARAMETER
from export.triton_config import parse

log = logging.getLogger(__name__)


def needs_online_store(repository: Path) -> bool:
    """Whether a model of `repository` (its config.pbtxt) is a raw-transaction model reading the online store."""
    configs = sorted(Path(repository).glob("*/config.pbtxt")) if Path(repository).is_dir() else []
    return any(NAMESPACE_PARAMETER in parse(p.read_text(), source=str(p)).parameters for p in configs)


@contextmanager
def online_store_url(workspace_root: Path, repository: Path) -> Iterator[str | None]:
    """TREEOPS_ONLINE_STORE_URL when set; else, when `repository` needs a store, a redis-server started in
    `<workspace>/online_store/` (AOF on, the state kept across runs) for as long as the block runs; else None."""
    from online_store.redis_server import LocalRedis
    from online_store.settings import OnlineStoreSettings

    url = OnlineStoreSettings().url
    if url is not None or not needs_online_store(repository):
        if url is not None:
            log.info("online store: %s (TREEOPS_ONLINE_STORE_URL)", redacted(url))
        yield url
        return
    with LocalRedis(workspace_root) as local:
        log.info("online store: local redis-server %s (data in %s); set TREEOPS_ONLINE_STORE_URL to use another",
                 local.url, local.dir)
        yield local.url
