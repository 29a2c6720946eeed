"""Typed gRPC scoring clients (blocking and asyncio) for services calling Triton.

Each client reads the served model's signature from Triton's model metadata on first use (or takes one
given), and builds every request from it: the feature tensor of tensor models (`features` ->
`probabilities`, FIL's `input__0` -> `output__0`) or one input per raw field of raw-input models.
Raw-transaction models (history features read and updated in the online store inside Triton) score
transactions with `score_transactions`; chunks of one call are sent one after another, in order, so
the store applies a card's transactions in the order given.
"""

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
from tritonclient.utils import InferenceServerException

from export.signature import ServedSignature
from server.errors import ScoringError, ServerError
from server.requests import DEGRADED, READ_ONLY, conform, grpc_request
from training.features import FittedFeatures, load_fitted

log = logging.getLogger(__name__)

RETRYABLE = {"StatusCode.UNAVAILABLE"}
PemFile = str | os.PathLike[str] | None


@dataclass(frozen=True)
class Scores:
    """The score output for each row (rows x classes, or rows x 1 for a regressor) and the version that answered;
    `degraded` (raw-transaction models): per row, scored without history because the online store was down."""

    probabilities: np.ndarray
    model_version: str
    degraded: np.ndarray | None = None

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
        signature: ServedSignature | None = None,
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
        self._signature = signature
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_rows_per_request = max_rows_per_request
        self.ssl = ssl
        self._client = self._connect(url, tls_options(ssl, root_certificates, private_key, certificate_chain))

    def _connect(self, url: str, tls: dict[str, object]) -> Any:
        raise NotImplementedError

    def _chunks(self, signature: ServedSignature, feeds: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        feeds = conform(signature, feeds)
        n, step = len(next(iter(feeds.values()))), self.max_rows_per_request
        return [{k: v[start : start + step] for k, v in feeds.items()} for start in range(0, n, step)]

    @staticmethod
    def _matrix(features: np.ndarray) -> np.ndarray:
        x = np.asarray(features)
        if x.ndim != 2 or 0 in x.shape:
            raise ScoringError(f"expected a non-empty 2-D feature matrix (rows x features), got shape {x.shape}")
        return x

    def _feature_feeds(self, signature: ServedSignature, x: np.ndarray) -> dict[str, np.ndarray]:
        tensor = signature.feature_tensor
        if tensor is None:
            raise ScoringError(
                f"model {self.model_name!r} takes raw fields, not a feature matrix ({signature.describe()}): "
                "use score_raw (rows of raw fields) or score_inputs"
            )
        return {tensor.name: x}

    def _metadata_signature(self, metadata: Mapping[str, Any]) -> ServedSignature:
        self._signature = ServedSignature.from_metadata(metadata)
        log.debug("model %r on %s: %s", self.model_name, self.url, self._signature.describe())
        return self._signature

    @staticmethod
    def _output(result: Any, signature: ServedSignature) -> tuple[np.ndarray, str, np.ndarray | None]:
        degraded = result.as_numpy(DEGRADED)
        return (result.as_numpy(signature.output.name), result.get_response().model_version,
                None if degraded is None else degraded.reshape(-1))

    @staticmethod
    def _parameters(read_only: bool) -> dict[str, bool] | None:
        return {READ_ONLY: True} if read_only else None

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
    def _scores(parts: list[tuple[np.ndarray, str, np.ndarray | None]]) -> Scores:
        probs = [p for p, _, _ in parts]
        flags = [d for _, _, d in parts if d is not None]
        return Scores(np.concatenate(probs) if len(probs) > 1 else probs[0], parts[-1][1],
                      np.concatenate(flags) if flags else None)


class ScoringClient(_ScoringBase):
    """One reusable gRPC connection to Triton for one model.

    Requests follow `signature` if given, else the signature read once from the model's metadata
    (`served_signature()`): inputs are checked against it and cast to its datatypes before sending.
    `timeout_s` is the per-request deadline; UNAVAILABLE answers are retried `retries` times
    with exponential backoff starting at `backoff_s`. Large inputs are split into requests of
    at most `max_rows_per_request` rows. `ssl=True` speaks TLS, trusting `root_certificates`
    (a PEM CA file; None: the system's CAs); `private_key` + `certificate_chain` add a client
    certificate for mutual TLS.
    """

    def _connect(self, url: str, tls: dict[str, object]) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(url, **tls)

    def served_signature(self) -> ServedSignature:
        """The model's signature: the one given, else read once from Triton's model metadata."""
        if self._signature is None:
            return self._metadata_signature(self._call(
                lambda: self._client.get_model_metadata(self.model_name, self.model_version, as_json=True,
                                                        client_timeout=self.timeout_s)))
        return self._signature

    def score(self, features: np.ndarray) -> Scores:
        """Score a feature matrix (rows x features in feature-spec order) with a feature-tensor model."""
        x = self._matrix(features)
        signature = self.served_signature()
        return self.score_inputs(self._feature_feeds(signature, x))

    def score_inputs(self, feeds: Mapping[str, np.ndarray]) -> Scores:
        """Score input tensors by name (each rows x dims), cast to the signature's datatypes; any model."""
        signature = self.served_signature()
        return self._scores([self._infer(signature, part) for part in self._chunks(signature, feeds)])

    def score_raw(self, features: FittedFeatures, raw: pl.DataFrame | Sequence[Mapping[str, Any]]) -> Scores:
        """Score rows of raw fields (a DataFrame or dicts): the inputs the signature names, computed with `features`
        (a raw-input model: `score_transactions`, rows in the order given)."""
        signature = self.served_signature()
        if signature.feature_tensor is None:
            return self.score_transactions(raw_frame(features, raw))
        return self.score_inputs(request_feeds(signature, features, raw))

    def score_transactions(self, raw: pl.DataFrame | Sequence[Mapping[str, Any]], read_only: bool = False) -> Scores:
        """Score raw transactions with a raw-input model: one input per field the signature names (Datetime as
        epoch µs). Rows go in the order given; `read_only` scores without adding them to the online store."""
        signature = self.served_signature()
        parameters = self._parameters(read_only)
        return self._scores([self._infer(signature, part, parameters)
                             for part in self._chunks(signature, transaction_feeds(signature, raw))])

    def _infer(self, signature: ServedSignature, feeds: Mapping[str, np.ndarray],
               parameters: dict[str, bool] | None = None) -> tuple[np.ndarray, str, np.ndarray | None]:
        inputs, outputs = grpc_request(signature, feeds)
        return self._output(self._call(lambda: self._client.infer(
            self.model_name, inputs, model_version=self.model_version, outputs=outputs,
            client_timeout=self.timeout_s, parameters=parameters)), signature)

    def _call(self, send: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return send()
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

    async def served_signature(self) -> ServedSignature:
        """The model's signature: the one given, else read once from Triton's model metadata."""
        if self._signature is None:
            return self._metadata_signature(await self._call(
                lambda: self._client.get_model_metadata(self.model_name, self.model_version, as_json=True,
                                                        client_timeout=self.timeout_s)))
        return self._signature

    async def score(self, features: np.ndarray) -> Scores:
        """Score a feature matrix (rows x features in feature-spec order) with a feature-tensor model."""
        x = self._matrix(features)
        signature = await self.served_signature()
        return await self.score_inputs(self._feature_feeds(signature, x))

    async def score_inputs(self, feeds: Mapping[str, np.ndarray]) -> Scores:
        """Score input tensors by name (each rows x dims), cast to the signature's datatypes; chunks run concurrently."""
        signature = await self.served_signature()
        parts = self._chunks(signature, feeds)
        return self._scores(list(await asyncio.gather(*(self._infer(signature, part) for part in parts))))

    async def score_raw(self, features: FittedFeatures, raw: pl.DataFrame | Sequence[Mapping[str, Any]]) -> Scores:
        """Score rows of raw fields (a DataFrame or dicts): the inputs the signature names, computed with `features`
        (a raw-input model: `score_transactions`, its chunks one after another)."""
        signature = await self.served_signature()
        if signature.feature_tensor is None:
            return await self.score_transactions(raw_frame(features, raw))
        return await self.score_inputs(request_feeds(signature, features, raw))

    async def score_transactions(self, raw: pl.DataFrame | Sequence[Mapping[str, Any]],
                                 read_only: bool = False) -> Scores:
        """`ScoringClient.score_transactions`: chunks are sent one after another (the store applies them in order)."""
        signature = await self.served_signature()
        parameters = self._parameters(read_only)
        return self._scores([await self._infer(signature, part, parameters)
                             for part in self._chunks(signature, transaction_feeds(signature, raw))])

    async def _infer(self, signature: ServedSignature, feeds: Mapping[str, np.ndarray],
                     parameters: dict[str, bool] | None = None) -> tuple[np.ndarray, str, np.ndarray | None]:
        inputs, outputs = grpc_request(signature, feeds)
        return self._output(await self._call(lambda: self._client.infer(
            self.model_name, inputs, model_version=self.model_version, outputs=outputs,
            client_timeout=self.timeout_s, parameters=parameters)), signature)

    async def _call(self, send: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return await send()
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


def request_feeds(
    signature: ServedSignature, features: FittedFeatures, raw: pl.DataFrame | Sequence[Mapping[str, Any]]
) -> dict[str, np.ndarray]:
    """The inputs `signature` names for rows of raw fields (a DataFrame or dicts), checked and cast to it.

    A feature-tensor model gets the spec's features of the rows (its history features computed over
    these rows alone); a raw-input model gets one input per raw field (`transaction_feeds`).
    """
    raw = raw_frame(features, raw)
    tensor = signature.feature_tensor
    if tensor is not None:
        return conform(signature, {tensor.name: features.matrix_raw(raw)})
    return transaction_feeds(signature, raw)


def raw_frame(features: FittedFeatures, raw: pl.DataFrame | Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """`raw` as a DataFrame; dicts are read with the spec's raw schema."""
    return raw if isinstance(raw, pl.DataFrame) else pl.DataFrame(list(raw), schema=features.spec.raw_schema,
                                                                   strict=False)


def transaction_feeds(signature: ServedSignature, raw: pl.DataFrame | Sequence[Mapping[str, Any]]
                      ) -> dict[str, np.ndarray]:
    """One input per raw field `signature` names, [rows, 1], checked and cast to it: Datetime fields as epoch
    microseconds UTC (INT64), text as BYTES (null: empty, an unknown category), null numbers as NaN.

    Raises ScoringError naming a missing field, or a null in an integer or time field (row given).
    """
    frame = raw if isinstance(raw, pl.DataFrame) else pl.DataFrame(list(raw), strict=False)
    feeds: dict[str, np.ndarray] = {}
    for t in signature.inputs:
        if t.name not in frame.columns:
            raise ScoringError(f"the transactions have no field {t.name!r}; the served model takes "
                               f"{[i.name for i in signature.inputs]} ({signature.describe()})")
        col = frame[t.name]
        if col.dtype.is_temporal():
            col = col.cast(pl.Datetime("us")).dt.epoch("us")
        if t.datatype == "BYTES":
            values = col.cast(pl.String).fill_null("").to_numpy().astype(object)
        elif t.datatype.startswith("FP"):
            values = col.cast(pl.Float64).fill_null(float("nan")).to_numpy()
        else:
            if col.null_count():
                row = col.is_null().arg_max()
                raise ScoringError(f"field {t.name!r} row {row} is null; the served model takes {t.describe()}")
            values = col.to_numpy()
        feeds[t.name] = values.reshape(-1, *t.dims)
    return conform(signature, feeds)


def score_raw(
    client: ScoringClient, features: FittedFeatures, raw: pl.DataFrame | Sequence[Mapping[str, Any]]
) -> Scores:
    """`client.score_raw(features, raw)`: rows of raw fields scored with the inputs the served model takes."""
    return client.score_raw(features, raw)
