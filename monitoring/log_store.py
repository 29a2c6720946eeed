"""Where a prediction log lives: a local folder or `s3://bucket/prefix`, listed and read through one pyarrow filesystem.

S3: the endpoint of an S3-compatible server comes from `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), credentials
and region from the standard AWS environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from monitoring.errors import MonitoringError

S3_SCHEME = "s3://"
_FIX = ("check the bucket name, AWS_ENDPOINT_URL (an S3-compatible server), and the AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY / AWS_REGION environment variables")


class LogStoreError(MonitoringError):
    """The log's bucket cannot be reached, listed, read or written; the message names the URI and the cause."""


def as_log_root(value: Path | str) -> Path | str:
    """An `s3://` URI kept as text (a Path would fold its `//`), anything else as a local Path."""
    return str(value) if str(value).startswith(S3_SCHEME) else Path(value)


@dataclass(frozen=True)
class LogStore:
    """A log root: `fs` holds it at `path` (`bucket/prefix` for S3); `uri(p)` names a file of it in messages."""

    fs: pafs.FileSystem
    path: str
    scheme: str  # "s3://" or "" (local)

    @classmethod
    def open(cls, root: Path | str) -> LogStore:
        """The store of a local folder or an `s3://bucket/prefix` URI (its bucket checked: LogStoreError if not)."""
        text = str(root)
        if not text.startswith(S3_SCHEME):
            return cls(pafs.LocalFileSystem(), Path(root).as_posix(), "")
        try:
            fs, path = pafs.FileSystem.from_uri(text)
            bucket = fs.get_file_info(path.split("/", 1)[0])
        except (OSError, ValueError) as exc:
            raise LogStoreError(f"cannot reach the prediction log {text}: {exc}; {_FIX}") from exc
        if bucket.type == pafs.FileType.NotFound:
            raise LogStoreError(f"the prediction log's bucket in {text} does not exist; create it or {_FIX}")
        return cls(fs, path.rstrip("/"), S3_SCHEME)

    def uri(self, path: str) -> str:
        """`path` of this store as a user gives it (with `s3://` for S3)."""
        return self.scheme + path

    def list(self, folder: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """The entries under `folder`, sorted by path; none where it does not exist."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True, recursive=recursive))
        except OSError as exc:
            raise LogStoreError(f"cannot list {self.uri(folder)}: {exc}; {_FIX}") from exc
        return sorted(infos, key=lambda i: i.path)

    def read_bytes(self, path: str) -> bytes:
        """The whole file (a journal's prefix as of now, for a journal still being appended)."""
        with self.fs.open_input_stream(path) as f:
            return f.readall()
