"""Admin-key client for Triton's model-repository API (load, unload, index) over gRPC."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tritonclient.grpc as grpcclient
from pydantic import SecretStr
from tritonclient.utils import InferenceServerException

from server.client import PemFile, tls_options
from server.errors import ServerError, effective_grpc_status
from server.settings import ADMIN_KEY_ENV, DEFAULT_ADMIN_HEADER, TritonSettings

log = logging.getLogger(__name__)

#: Triton matches a gRPC restriction key `k` against the metadata key `triton-grpc-protocol-k`.
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"


class AdminError(ServerError):
    """An admin call failed: Triton unreachable, a model that does not load, a timeout."""


class AdminKeyError(AdminError):
    """Triton refused an admin call because the admin key was missing or wrong.

    `status` is what the refusal means in gRPC terms (UNAUTHENTICATED: no key sent; PERMISSION_DENIED: a wrong
    key), not Triton's UNAVAILABLE, which would look transient: retrying cannot help.
    """

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RepositoryModel:
    """One entry of the repository index: a model version Triton knows and its state."""

    name: str
    version: str
    state: str
    reason: str


class AdminClient:
    """Model-repository calls that send the admin key as `header` (see `TritonSettings.admin_key`).

    `admin_key` None sends no key (for a server without restrictions). `timeout_s` bounds each
    call, model loads included. TLS options are those of `ScoringClient`.
    """

    def __init__(
        self,
        url: str,
        admin_key: str | SecretStr | None,
        *,
        header: str = DEFAULT_ADMIN_HEADER,
        timeout_s: float = 120.0,
        ssl: bool = False,
        root_certificates: PemFile = None,
        private_key: PemFile = None,
        certificate_chain: PemFile = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.ssl = ssl
        self._key = SecretStr(admin_key) if isinstance(admin_key, str) else admin_key
        self._headers = {GRPC_RESTRICTED_PREFIX + header: self._key.get_secret_value()} if self._key else None
        tls = tls_options(ssl, root_certificates, private_key, certificate_chain, error=AdminError)
        self._client = grpcclient.InferenceServerClient(url, **tls)  # type: ignore[arg-type]

    @classmethod
    def from_settings(
        cls,
        settings: TritonSettings,
        *,
        timeout_s: float = 120.0,
        root_certificates: PemFile = None,
        private_key: PemFile = None,
        certificate_chain: PemFile = None,
    ) -> AdminClient:
        """A client for the server these settings start: its gRPC address, admin key, header and TLS."""
        return cls(
            settings.grpc_url, settings.admin_key, header=settings.admin_header, timeout_s=timeout_s,
            ssl=settings.grpc_use_ssl or settings.grpc_use_ssl_mutual, root_certificates=root_certificates,
            private_key=private_key, certificate_chain=certificate_chain,
        )

    def load_model(self, name: str, config_json: str | None = None) -> None:
        """Load or reload `name`; `config_json` (model config as JSON) overrides its config.pbtxt."""
        log.info("loading model %r on %s", name, self.url)
        self._call(f"load model {name!r}", self._client.load_model, name, config=config_json)

    def unload_model(self, name: str) -> None:
        """Unload every version of `name`."""
        log.info("unloading model %r on %s", name, self.url)
        self._call(f"unload model {name!r}", self._client.unload_model, name)

    def repository_index(self) -> list[RepositoryModel]:
        """Every model version in the repository, loaded or not, with its state."""
        response = self._call("read the repository index", self._client.get_model_repository_index)
        return [RepositoryModel(m.name, m.version, m.state, m.reason) for m in response.models]

    def model_ready(self, name: str, version: str | int = "") -> bool:
        """Whether `name` (at `version`; "" = Triton's choice) is ready to serve."""
        return bool(self._call(f"check model {name!r}", self._client.is_model_ready, name, str(version)))

    def _call(self, what: str, method: Callable[..., Any], *args: object, **kwargs: object) -> Any:
        try:
            return method(*args, headers=self._headers, client_timeout=self.timeout_s, **kwargs)
        except InferenceServerException as exc:
            raise self._failure(what, exc) from exc

    def _failure(self, what: str, exc: InferenceServerException) -> AdminError:
        message = (exc.message() or "").strip().rstrip(";")
        status = effective_grpc_status(str(exc.status()), message, key_sent=self._key is not None)
        if status in {"StatusCode.UNAUTHENTICATED", "StatusCode.PERMISSION_DENIED"}:
            sent = "no admin key was sent" if self._key is None else "the admin key sent does not match"
            return AdminKeyError(
                f"admin key rejected by Triton at {self.url} ({what}, {status.removeprefix('StatusCode.')}): {sent}; "
                f"set {ADMIN_KEY_ENV} to the key the server was started with",
                status,
            )
        if status == "StatusCode.UNAVAILABLE":
            tls = "ssl=True" if self.ssl else "ssl=False (pass ssl=True if the server uses TLS)"
            return AdminError(f"cannot {what}: Triton at {self.url} is unreachable with {tls}: {message}")
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return AdminError(f"cannot {what} on {self.url} within {self.timeout_s:g}s: raise timeout_s")
        return AdminError(f"cannot {what} on {self.url}: {status} {message}; see the Triton log for details")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_control(url: str | None) -> AdminClient | None:
    """A model-control client of the Triton at `url` with the admin key from TritonSettings (None: no Triton)."""
    if not url:
        return None
    key = TritonSettings().admin_key
    return AdminClient(url, admin_key=key.get_secret_value() if key else None)
