"""Typed gRPC scoring clients (blocking and asyncio) for services calling Triton."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from server.errors import ScoringError, ServerError
from training.features import FittedFeatures, load_fitted

log = logging.getLogger(__name__)

INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
RETRYABLE = {"StatusCode.UNAVAILABLE"}
PemFile = str | os.PathLike[str] | None


@dataclass(frozen=True)
class Scores:
    """Probabilities for each row (rows x classes) and the model version that answered."""

    probabilities: np.ndarray
    model_version: str

    @property
    def positive(self) -> np.ndarray:
        """Probability of the positive class for each row."""
        return self.probabilities[:, -1]


def tls_options(
    ssl: bool,
    root_certificates: PemFile,
    private_key: PemFile,
    certificate_chain: PemFile,
    error: type[ServerError] = ScoringError,
) -> dict[str, object]:
    """tritonclient gRPC TLS keyword arguments, after checking that every named PEM file is readable.

    `root_certificates`: CA that signed the server certificate (None: the system's CAs);
    `private_key` + `certificate_chain`: the client's own identity, for mutual TLS.
    """
    files = {"root_certificates": root_certificates, "private_key": private_key, "certificate_chain": certificate_chain}
    named = {k: Path(v) for k, v in files.items() if v is not None}
    if named and not ssl:
        raise error(f"{', '.join(named)} given without ssl=True: pass ssl=True to use TLS")
    if (private_key is None) != (certificate_chain is None):
        raise error("mutual TLS needs both private_key and certificate_chain (the client's PEM key and certificate)")
    for name, path in named.items():
        if not os.access(path, os.R_OK):
            raise error(f"{name} file {path} is missing or unreadable: pass the path of a PEM file")
    return {"ssl": ssl, **{k: str(v) for k, v in named.items()}}


class _ScoringBase:
    """Options, request building and error translation shared by `ScoringClient` and `AsyncScoringClient`."""

    def __init__(
        self,
        url: str,
        model_name: str = "fraud",
        *,
        model_version: str = "",
        timeout_s: float = 2.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_rows_per_request: int = 1024,
        ssl: bool = False,
        root_certificates: PemFile = None,
        private_key: PemFile = None,
        certificate_chain: PemFile = None,
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.model_version = model_version
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_rows_per_request = max_rows_per_request
        self.ssl = ssl
        self._client = self._connect(url, tls_options(ssl, root_certificates, private_key, certificate_chain))

    def _connect(self, url: str, tls: dict[str, object]) -> Any:
        raise NotImplementedError

    def _chunks(self, feeds: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        rows = {len(v) for v in feeds.values()}
        if not feeds or len(rows) != 1 or 0 in rows or any(v.ndim != 2 for v in feeds.values()):
            shapes = {k: v.shape for k, v in feeds.items()}
            raise ScoringError(f"expected non-empty 2-D inputs with the same number of rows, got shapes {shapes}")
        n = rows.pop()
        step = self.max_rows_per_request
        return [{k: v[start : start + step] for k, v in feeds.items()} for start in range(0, n, step)]

    @staticmethod
    def _features(features: np.ndarray) -> dict[str, np.ndarray]:
        return {INPUT_NAME: np.ascontiguousarray(features, dtype=np.float32)}

    @staticmethod
    def _request(
        feeds: Mapping[str, np.ndarray],
    ) -> tuple[list[grpcclient.InferInput], list[grpcclient.InferRequestedOutput]]:
        inputs = []
        for name, values in feeds.items():
            inp = grpcclient.InferInput(name, list(values.shape), np_to_triton_dtype(values.dtype))
            inp.set_data_from_numpy(np.ascontiguousarray(values))
            inputs.append(inp)
        return inputs, [grpcclient.InferRequestedOutput(OUTPUT_NAME)]

    def _should_retry(self, exc: InferenceServerException, attempt: int) -> bool:
        return exc.status() in RETRYABLE and attempt < self.retries

    def _delay_s(self, attempt: int) -> float:
        return self.backoff_s * 2**attempt

    def _failure(self, exc: InferenceServerException, attempt: int) -> ScoringError:
        hint = ""
        if exc.status() in RETRYABLE:
            tls = "with TLS (ssl=True)" if self.ssl else "without TLS (pass ssl=True if the server uses TLS)"
            hint = f"; is Triton running at {self.url}, and serving gRPC {tls}?"
        tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
        return ScoringError(
            f"scoring on {self.url} model {self.model_name!r} failed ({tries}): {exc.status()} {exc.message()}{hint}"
        )

    @staticmethod
    def _scores(parts: list[tuple[np.ndarray, str]]) -> Scores:
        probs = [p for p, _ in parts]
        return Scores(np.concatenate(probs) if len(probs) > 1 else probs[0], parts[-1][1])


class ScoringClient(_ScoringBase):
    """One reusable gRPC connection to Triton for one model.

    `timeout_s` is the per-request deadline; UNAVAILABLE answers are retried `retries` times
    with exponential backoff starting at `backoff_s`. Large inputs are split into requests of
    at most `max_rows_per_request` rows. `ssl=True` speaks TLS, trusting `root_certificates`
    (a PEM CA file; None: the system's CAs); `private_key` + `certificate_chain` add a client
    certificate for mutual TLS.
    """

    def _connect(self, url: str, tls: dict[str, object]) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(url, **tls)

    def score(self, features: np.ndarray) -> Scores:
        """Score a float32 feature matrix (rows x features in feature-spec order)."""
        return self.score_inputs(self._features(features))

    def score_inputs(self, feeds: Mapping[str, np.ndarray]) -> Scores:
        """Score named input tensors of equal row count (e.g. a raw-input model's `raw_feeds`)."""
        return self._scores([self._infer(part) for part in self._chunks(feeds)])

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
        inputs, outputs = self._request(feeds)
        for attempt in range(self.retries + 1):
            try:
                result = self._client.infer(
                    self.model_name, inputs, model_version=self.model_version, outputs=outputs,
                    client_timeout=self.timeout_s,
                )
                return result.as_numpy(OUTPUT_NAME), result.get_response().model_version
            except InferenceServerException as exc:
                if not self._should_retry(exc, attempt):
                    raise self._failure(exc, attempt) from exc
                time.sleep(self._delay_s(attempt))
        raise AssertionError("unreachable")

    def is_ready(self) -> bool:
        """Whether the model answers ready within `timeout_s` (False on any error)."""
        try:
            return self._client.is_model_ready(self.model_name, self.model_version, client_timeout=self.timeout_s)
        except InferenceServerException:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncScoringClient(_ScoringBase):
    """The asyncio twin of `ScoringClient` (`tritonclient.grpc.aio`): same options, deadlines and retries.

    Create it inside the event loop that uses it; `score` sends a large input's chunks concurrently.
    """

    def _connect(self, url: str, tls: dict[str, object]) -> aiogrpcclient.InferenceServerClient:
        return aiogrpcclient.InferenceServerClient(url, **tls)

    async def score(self, features: np.ndarray) -> Scores:
        """Score a float32 feature matrix (rows x features in feature-spec order)."""
        return await self.score_inputs(self._features(features))

    async def score_inputs(self, feeds: Mapping[str, np.ndarray]) -> Scores:
        """Score named input tensors of equal row count; chunks are sent concurrently."""
        return self._scores(list(await asyncio.gather(*(self._infer(part) for part in self._chunks(feeds)))))

    async def _infer(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
        inputs, outputs = self._request(feeds)
        for attempt in range(self.retries + 1):
            try:
                result = await self._client.infer(
                    self.model_name, inputs, model_version=self.model_version, outputs=outputs,
                    client_timeout=self.timeout_s,
                )
                return result.as_numpy(OUTPUT_NAME), result.get_response().model_version
            except InferenceServerException as exc:
                if not self._should_retry(exc, attempt):
                    raise self._failure(exc, attempt) from exc
                await asyncio.sleep(self._delay_s(attempt))
        raise AssertionError("unreachable")

    async def is_ready(self) -> bool:
        """Whether the model answers ready within `timeout_s` (False on any error)."""
        try:
            return await self._client.is_model_ready(
                self.model_name, self.model_version, client_timeout=self.timeout_s
            )
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AsyncScoringClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def load_features(version_dir: Path) -> FittedFeatures:
    """The fitted feature spec stored in a repository version folder."""
    path = Path(version_dir) / "feature_spec.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ScoringError(f"cannot read the feature spec {path}: {exc}; export the model first") from exc
    return load_fitted(data)


def score_raw(
    client: ScoringClient, features: FittedFeatures, raw: pl.DataFrame | Sequence[Mapping[str, Any]]
) -> Scores:
    """Compute features from raw rows (a DataFrame or dicts of raw fields) with the model's spec, then score."""
    if not isinstance(raw, pl.DataFrame):
        raw = pl.DataFrame(list(raw), schema=features.spec.raw_schema, strict=False)
    return client.score(features.matrix_raw(raw))
