"""The asyncio scoring client answers like the blocking one; deadlines, retries and TLS options fail clearly."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.client import AsyncScoringClient, ScoringClient
from server.errors import ScoringError
from server.launcher import free_port

N_FEATURES = 10


def _batches(count: int, seed: int = 1) -> list[np.ndarray]:
    """`count` feature matrices of 1..64 rows, with missing values (NaN) in some cells."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.normal(size=(int(rng.integers(1, 65)), N_FEATURES)).astype(np.float32)
        x[rng.random(x.shape) < 0.1] = np.nan
        out.append(x)
    return out


@pytest.mark.triton
def test_concurrent_async_scores_equal_the_sync_clients(triton):
    batches = _batches(300)
    with ScoringClient(triton.settings.grpc_url) as client:
        expected = [client.score(x) for x in batches]

    async def score_all():
        async with AsyncScoringClient(triton.settings.grpc_url) as client:
            assert await client.is_ready()
            return await asyncio.gather(*(client.score(x) for x in batches))

    got = asyncio.run(score_all())
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have.probabilities, want.probabilities, atol=1e-6)
        assert have.model_version == want.model_version


@pytest.mark.triton
def test_async_client_splits_large_inputs_in_order(triton):
    x = np.concatenate(_batches(40, seed=2))

    async def score():
        async with AsyncScoringClient(triton.settings.grpc_url, max_rows_per_request=50) as client:
            return await client.score(x)

    with ScoringClient(triton.settings.grpc_url) as client:
        expected = client.score(x).probabilities
    np.testing.assert_allclose(asyncio.run(score()).probabilities, expected, atol=1e-6)


@pytest.mark.triton
def test_an_expired_deadline_is_reported_without_retries(triton):
    # gRPC keeps deadlines to the millisecond, so a 1 us deadline is ~1 ms: score 1,024 rows (several ms)
    # to make sure it expires.
    big = np.random.default_rng(0).normal(size=(1024, N_FEATURES)).astype(np.float32)

    async def score():
        async with AsyncScoringClient(triton.settings.grpc_url, timeout_s=1e-6, retries=3) as client:
            return await client.score(big)

    with pytest.raises(ScoringError, match=r"\(1 attempt\): StatusCode.DEADLINE_EXCEEDED"):
        asyncio.run(score())
    with ScoringClient(triton.settings.grpc_url, timeout_s=1e-6) as client:
        with pytest.raises(ScoringError, match=r"\(1 attempt\): StatusCode.DEADLINE_EXCEEDED"):
            client.score(big)


@pytest.mark.triton
def test_async_errors_name_the_model_and_unknown_models_are_not_ready(triton):
    async def run():
        async with AsyncScoringClient(triton.settings.grpc_url, model_name="nope", retries=0) as client:
            assert not await client.is_ready()
            await client.score(np.zeros((1, N_FEATURES), dtype=np.float32))

    with pytest.raises(ScoringError, match="'nope'"):
        asyncio.run(run())


def test_unreachable_server_is_retried_then_reported():
    url = f"127.0.0.1:{free_port()}"

    async def score():
        async with AsyncScoringClient(url, retries=2, backoff_s=0.01) as client:
            return await client.score(np.zeros((1, N_FEATURES), dtype=np.float32))

    with pytest.raises(ScoringError, match=f"3 attempts.*UNAVAILABLE.*is Triton running at {url}"):
        asyncio.run(score())


@pytest.mark.parametrize("bad", [np.zeros((0, N_FEATURES)), np.zeros(N_FEATURES), np.zeros((2, 3, 4))])
def test_async_client_rejects_unusable_matrices_before_sending(bad):
    async def score():
        async with AsyncScoringClient(f"127.0.0.1:{free_port()}", retries=0) as client:
            return await client.score(bad)

    with pytest.raises(ScoringError, match="non-empty 2-D"):
        asyncio.run(score())


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"root_certificates": "ca.pem"}, "without ssl=True"),
        ({"ssl": True, "root_certificates": "missing.pem"}, "root_certificates file missing.pem is missing"),
        ({"ssl": True, "private_key": "client.key"}, "both private_key and certificate_chain"),
    ],
)
def test_tls_options_are_checked_up_front(tmp_path, monkeypatch, options, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ScoringError, match=problem):
        ScoringClient("127.0.0.1:1", **options)
