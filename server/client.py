"""Typed gRPC scoring client for services calling Triton."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server.errors import ScoringError
from training.features import FittedFeatures, load_fitted

log = logging.getLogger(__name__)

INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
RETRYABLE = {"StatusCode.UNAVAILABLE"}


@dataclass(frozen=True)
class Scores:
    """Probabilities for each row (rows x classes) and the model version that answered."""

    probabilities: np.ndarray
    model_version: str

    @property
    def positive(self) -> np.ndarray:
        """Probability of the positive class for each row."""
        return self.probabilities[:, -1]


class ScoringClient:
    """One reusable gRPC connection to Triton for one model.

    `timeout_s` is the per-request deadline; UNAVAILABLE answers are retried `retries` times
    with exponential backoff starting at `backoff_s`. Large inputs are split into requests of
    at most `max_rows_per_request` rows.
    """

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
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.model_version = model_version
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_rows_per_request = max_rows_per_request
        self._client = grpcclient.InferenceServerClient(url)

    def score(self, features: np.ndarray) -> Scores:
        """Score a float32 feature matrix (rows x features in feature-spec order)."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ScoringError(f"expected a non-empty 2-D feature matrix, got shape {x.shape}")
        parts, version = [], ""
        for start in range(0, len(x), self.max_rows_per_request):
            probs, version = self._infer(x[start : start + self.max_rows_per_request])
            parts.append(probs)
        return Scores(np.concatenate(parts) if len(parts) > 1 else parts[0], version)

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, str]:
        inp = grpcclient.InferInput(INPUT_NAME, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = [grpcclient.InferRequestedOutput(OUTPUT_NAME)]
        for attempt in range(self.retries + 1):
            try:
                result = self._client.infer(
                    self.model_name, [inp], model_version=self.model_version, outputs=out, client_timeout=self.timeout_s
                )
                return result.as_numpy(OUTPUT_NAME), result.get_response().model_version
            except InferenceServerException as exc:
                if exc.status() not in RETRYABLE or attempt == self.retries:
                    raise ScoringError(
                        f"scoring on {self.url} model {self.model_name!r} failed: {exc.status()} {exc.message()}"
                    ) from exc
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def is_ready(self) -> bool:
        try:
            return self._client.is_model_ready(self.model_name, self.model_version)
        except InferenceServerException:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_features(version_dir: Path) -> FittedFeatures:
    """The fitted feature spec stored in a repository version folder."""
    path = Path(version_dir) / "feature_spec.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ScoringError(f"cannot read the feature spec {path}: {exc}; export the model first") from exc
    return load_fitted(data)


def score_raw(client: ScoringClient, features: FittedFeatures, raw: pl.DataFrame) -> Scores:
    """Compute features from raw transaction rows with the model's spec, then score them."""
    return client.score(features.matrix_raw(raw))
