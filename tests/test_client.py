"""The asyncio scoring client answers like the blocking one; deadlines, retries and TLS options fail clearly."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest

from server.client import AsyncScoringClient, ScoringClient
from server.errors import ScoringError
from server.launcher import free_port
from training.features import FRAUD_FEATURES

N_FEATURES = len(FRAUD_FEATURES.names)  # the fraud model the `trained` workspace serves


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
    # gRPC keeps deadlines to the millisecond, so a 1 us deadline is ~1 ms, and Triton answers a row faster than
    # that: the calls go through a proxy that holds every answer for 50 ms, so the deadline always expires first.
    rows = np.random.default_rng(0).normal(size=(4, N_FEATURES)).astype(np.float32)

    async def score(url: str):
        async with AsyncScoringClient(url, timeout_s=1e-6, retries=3) as client:
            return await client.score(rows)

    with SlowProxy(triton.settings.grpc_url, delay_s=0.05) as url:
        with pytest.raises(ScoringError, match=r"\(1 attempt\): StatusCode.DEADLINE_EXCEEDED"):
            asyncio.run(score(url))
        with ScoringClient(url, timeout_s=1e-6) as client:
            with pytest.raises(ScoringError, match=r"\(1 attempt\): StatusCode.DEADLINE_EXCEEDED"):
                client.score(rows)
        with ScoringClient(url, timeout_s=5) as client:  # the same path answers within a usual deadline
            assert client.score(rows).positive.shape == (4,)


class SlowProxy:
    """A TCP proxy to `upstream` ("host:port") that delays every chunk the server sends by `delay_s`."""

    def __init__(self, upstream: str, delay_s: float) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream, self.delay_s = (host, int(port)), delay_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.closed = threading.Event()

    def __enter__(self) -> str:
        threading.Thread(target=self._accept, daemon=True).start()
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.closed.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.delay_s), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay_s: float) -> None:
        try:
            while chunk := src.recv(65536):
                time.sleep(delay_s)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()


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
