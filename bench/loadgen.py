"""Closed-loop load from this process or from spawned ones: the light HTTP/2 client (bench.h2) or grpc.aio.

Every process runs its share of the users for one step's window (CLOCK_MONOTONIC, shared by the
processes); the first one also samples the server (bench.sampling) at the window's two ends.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Any

import grpc

from bench.errors import RequestFailedError
from bench.h2 import H2Load, Window
from bench.sampling import Observer
from bench.settings import Client


@dataclass(frozen=True)
class LoadJob:
    """One closed-loop step for a load-generator process (picklable)."""

    client: Client
    method: str
    payload_key: str
    concurrency: int
    start_ns: int
    stop_ns: int
    connections: int


async def _closed_loop(url: str, payload_sets: dict[str, tuple[list[bytes], int]], job: LoadJob,
                       observe: Observer | None) -> dict[str, Any]:
    """Run `job` until its window closes; `observe` samples the server at both ends of the window."""
    messages, expected = payload_sets[job.payload_key]
    window = Window(job.start_ns, job.stop_ns)
    marks: list[tuple[float, float, dict[str, int]]] = []

    async def window_marks() -> None:
        for at in (window.start_ns, window.stop_ns):
            await asyncio.sleep(max(at - time.perf_counter_ns(), 0) / 1e9)
            cpu, stats = observe.sample() if observe is not None else (0.0, {})
            marks.append((time.process_time(), cpu, stats))

    shares = [job.concurrency // job.connections + (i < job.concurrency % job.connections)
              for i in range(job.connections)]
    loop = _h2_loop if job.client == "h2" else _aio_loop
    sent = await loop(url, job.method, messages, expected, [s for s in shares if s], window, window_marks())
    out: dict[str, Any] = {"latencies_ns": window.latencies_ns, "failures": window.failures,
                           "cpu_s": marks[1][0] - marks[0][0], "sent": sent}
    if observe is not None:
        out["server_cpu_s"] = marks[1][1] - marks[0][1]
        out["stats"] = (marks[0][2], marks[1][2])
    return out


async def _h2_loop(url: str, method: str, messages: list[bytes], expected: int, shares: list[int], window: Window,
                   marks: Any) -> int:
    """Run the step over one connection per share; returns the calls sent in all."""
    loop = asyncio.get_running_loop()
    host, port = url.rsplit(":", 1)
    connections = []
    for i, users in enumerate(shares):
        done: asyncio.Future[None] = loop.create_future()
        transport, protocol = await loop.create_connection(
            lambda users=users, done=done, i=i: H2Load(url, method, messages, expected, users, window, done, first=i * 7),
            host, int(port))
        connections.append((transport, done, protocol))
    try:
        await marks
        for _, done, _ in connections:
            try:
                await asyncio.wait_for(done, timeout=60)
            except TimeoutError:
                raise RequestFailedError(f"calls to {url} were still open 60 s after the step ended: is Triton "
                                         "stuck? See its log (triton.log in the benchmark's workdir)") from None
    finally:
        for transport, _, _ in connections:
            transport.close()
    return sum(protocol.sent for _, _, protocol in connections)


async def _aio_loop(url: str, method: str, messages: list[bytes], expected: int, shares: list[int], window: Window,
                    marks: Any) -> int:
    """Run the step with one grpc.aio channel per share; returns the calls sent in all."""
    channels = [grpc.aio.insecure_channel(url) for _ in shares]
    sent = 0
    try:
        async def user(call: Any, k: int) -> None:
            nonlocal sent
            i = k * 7
            while True:
                start = time.perf_counter_ns()
                if start >= window.stop_ns:
                    return
                failure = None
                sent += 1
                try:
                    answer = await call(messages[i % len(messages)])
                    if len(answer) != expected:
                        failure = f"answer of {len(answer)} message bytes, expected {expected}"
                except grpc.aio.AioRpcError as exc:
                    failure = f"{exc.code().name}: {exc.details()}"
                if window.start_ns <= start < window.stop_ns:
                    if failure is None:
                        window.latencies_ns.append(time.perf_counter_ns() - start)
                    else:
                        window.failures.append(failure)
                i += 1

        calls = [ch.unary_unary(method) for ch in channels]
        users = [user(calls[c], k) for c, share in enumerate(shares) for k in range(share)]
        await asyncio.gather(marks, *users)
    finally:
        for ch in channels:
            await ch.close()
    return sent


def _client_process(conn: Any, url: str, payload_sets: dict[str, tuple[list[bytes], int]],
                    observe: Observer | None) -> None:
    """A load-generator process: says it is ready, then runs closed loops on request until it receives None."""
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            result = asyncio.run(_closed_loop(url, payload_sets, job, observe))
        except Exception as exc:  # reported to the parent, which raises RequestFailedError
            result = {"error": repr(exc)}
        conn.send(result)


class LoadGenerator:
    """Closed-loop load from this process (`processes == 1`) or from that many spawned processes.

    `payload_sets` maps a key to (serialized requests, expected response message bytes). `observe`
    is sampled by this process, or by the first spawned one, at the ends of each step's window.
    """

    def __init__(self, url: str, payload_sets: dict[str, tuple[list[bytes], int]], processes: int = 1,
                 connections: int = 1, observe: Observer | None = None) -> None:
        self.url = url
        self.payload_sets = payload_sets
        self.connections = connections
        self.observe = observe
        self._workers: list[tuple[Any, Any]] = []
        if processes > 1:
            ctx = mp.get_context("spawn")
            for i in range(processes):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_client_process, args=(child, url, payload_sets, observe if i == 0 else None),
                                   daemon=True)
                proc.start()
                self._workers.append((proc, parent))
            for _, parent in self._workers:  # spawned interpreters take a second or two to import
                if not parent.poll(60) or parent.recv() != "ready":
                    self.close()
                    raise RequestFailedError("a load-generator process did not start within 60 s")

    def run(self, client: Client, method: str, key: str, concurrency: int, warmup_s: float,
            step_s: float) -> dict[str, Any]:
        """Latencies (ns), failures, client CPU seconds, calls sent in all and the observer's samples of one
        closed-loop step."""
        lead_ns = 20_000_000 if not self._workers else 200_000_000  # time for the workers to receive the job
        start = time.perf_counter_ns() + lead_ns + int(warmup_s * 1e9)
        n = max(len(self._workers), 1)
        shares = [concurrency // n + (i < concurrency % n) for i in range(n)]
        shares[0] = max(shares[0], 1)  # the observing process always takes part
        jobs = [LoadJob(client, method, key, share, start, start + int(step_s * 1e9), min(self.connections, share))
                for share in shares if share]
        if not self._workers:
            return asyncio.run(_closed_loop(self.url, self.payload_sets, jobs[0], self.observe))
        for (_, conn), job in zip(self._workers, jobs):
            conn.send(job)
        parts = [conn.recv() for (_, conn), _ in zip(self._workers, jobs)]
        errors = [p["error"] for p in parts if "error" in p]
        if errors:
            raise RequestFailedError(f"a load-generator process failed: {errors[0]}")
        merged: dict[str, Any] = {
            "latencies_ns": [x for p in parts for x in p["latencies_ns"]],
            "failures": [x for p in parts for x in p["failures"]],
            "cpu_s": sum(p["cpu_s"] for p in parts),
            "sent": sum(p["sent"] for p in parts),
        }
        merged.update({k: parts[0][k] for k in ("server_cpu_s", "stats") if k in parts[0]})
        return merged

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._workers = []

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

