"""Copy the local prediction log to S3 under the same relative keys (`treeops log ship`), off the request path.

A pass compares the local segments with the bucket's listing (sizes; no state of its own) and uploads each complete
segment (`*.parquet`, `*.tlog`: `prediction_log.is_segment`) whose object is missing or of another size: a journal
that grew since its last upload replaces its object with the longer prefix, cut at its last whole record (a
record being appended waits for the next pass). Writers' `.tmp` and dot files are never shipped; local files are
never deleted (local retention does).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs

from monitoring.log_store import LogStore, LogStoreError
from monitoring.prediction_log import JOURNAL_SUFFIX, is_segment, whole_records

log = logging.getLogger(__name__)


class LogShipError(LogStoreError):
    """A pass left segments unshipped; the message names each bucket/key and the cause."""


@dataclass(frozen=True)
class ShipPass:
    """One pass: the keys uploaded (relative to the roots), their bytes, its seconds; `lag_s`: how long the oldest
    local byte not yet in the bucket had waited when the pass began (a grown journal's tail dated by its object's
    upload, a new segment by its mtime; 0: up to date); `failed`: one message per segment left unshipped."""

    uploaded: tuple[str, ...]
    bytes: int
    seconds: float
    lag_s: float
    failed: tuple[str, ...]

    def to_dict(self) -> dict:
        return {**asdict(self), "files": len(self.uploaded)}

    def line(self) -> str:
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return (f"shipped {len(self.uploaded)} files ({self.bytes:,} bytes) in {self.seconds:.2f} s, lag "
                f"{self.lag_s:.1f} s{failed}")


def ship_pass(local_root: Path, to: str) -> ShipPass:
    """Upload every local segment under `local_root` whose object under `to` (`s3://bucket/prefix`) is missing or
    of another size. Raises LogStoreError when the bucket cannot be reached or listed."""
    began = time.monotonic()
    now = time.time()
    source, target = LogStore.open(local_root), LogStore.open(to)
    remote = {i.path[len(target.path) + 1:]: i for i in target.list(target.path, recursive=True)
              if i.type == pafs.FileType.File}
    uploaded, failed, total, since = [], [], 0, []
    for info in source.list(source.path, recursive=True):
        key = info.path[len(source.path) + 1:]
        shipped = remote.get(key)
        if info.type != pafs.FileType.File or not is_segment(info.base_name) or (
                shipped is not None and shipped.size == info.size):
            continue
        try:
            data = source.read_bytes(info.path)
        except FileNotFoundError:  # deleted by local retention since the listing: nothing left to ship
            continue
        if info.base_name.endswith(JOURNAL_SUFFIX):  # an append may be under way: up to its last whole record
            data = data[:whole_records(data)]
            if not data or (shipped is not None and shipped.size == len(data)):
                continue
        since.append((shipped or info).mtime.timestamp())
        try:
            with target.fs.open_output_stream(f"{target.path}/{key}") as out:
                out.write(data)
        except OSError as exc:
            failed.append(f"cannot upload {info.path} to {target.uri(target.path)}/{key}: {exc}")
            continue
        uploaded.append(key)
        total += len(data)
    lag = max(0.0, now - min(since)) if since else 0.0
    return ShipPass(tuple(uploaded), total, time.monotonic() - began, lag, tuple(failed))


def ship_once(local_root: Path, to: str) -> ShipPass:
    """One pass; LogShipError (naming each bucket/key and its cause) when any segment was left unshipped."""
    result = ship_pass(local_root, to)
    if result.failed:
        raise LogShipError(f"{len(result.failed)} of the log's segments were not shipped (local files kept; the next "
                           "pass retries them): " + "; ".join(result.failed)).with_details(result.to_dict())
    return result


def ship_until(local_root: Path, to: str, interval_s: float, stop: threading.Event,
               report: Callable[[ShipPass], None]) -> ShipPass:
    """A pass every `interval_s` until `stop` is set, then a last one (what was on disk then is shipped), returned
    after raising LogShipError if it left segments unshipped. A failed pass before it is logged and retried."""
    while not stop.is_set():
        try:
            result = ship_pass(local_root, to)
            report(result)
            for failure in result.failed:
                log.warning("log ship: %s; retrying in %.0f s", failure, interval_s)
        except LogStoreError as exc:
            log.warning("log ship: %s; retrying in %.0f s", exc, interval_s)
        stop.wait(interval_s)
    result = ship_once(local_root, to)
    report(result)
    return result
