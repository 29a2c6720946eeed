"""A minimal HTTP/2 gRPC client for closed-loop load: HPACK literal headers, frames straight to the socket.

On a 2-core machine the client shares the CPUs with the server, so its cost decides what can be
measured: `grpc.aio` spends about 100-150 us of CPU per unary call here, `H2Load` about 10-20 us.
Requests are serialized once; it speaks plain-text HTTP/2 only; a call counts as answered when its
stream carried exactly the response message size the server returns to a checked `grpc` call for
the same request (Triton answers errors without a message); RST_STREAM or GOAWAY count as failures.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.errors import SettingsError


@dataclass
class Window:
    """The measuring window of a closed loop, in `time.perf_counter_ns()` (CLOCK_MONOTONIC, shared by processes)."""

    start_ns: int
    stop_ns: int
    latencies_ns: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
_END_STREAM, _END_HEADERS, _ACK, _PADDED = 0x1, 0x4, 0x1, 0x8
_MAX_WINDOW = 2**31 - 1


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _hpack_literal(value: str) -> bytes:
    raw = value.encode()
    if len(raw) >= 127:
        raise SettingsError(f"header value too long for the load generator: {value!r}")
    return bytes((len(raw),)) + raw


def grpc_request_headers(authority: str, method: str) -> bytes:
    """HPACK block of a gRPC request (POST, http, path, authority, application/grpc, te: trailers), no indexing."""
    return (b"\x83\x86" + b"\x04" + _hpack_literal(method) + b"\x01" + _hpack_literal(authority)
            + b"\x0f\x10" + _hpack_literal("application/grpc") + b"\x00" + _hpack_literal("te")
            + _hpack_literal("trailers"))


class H2Load(asyncio.Protocol):
    """A closed loop of `users` over one HTTP/2 connection: each sends its next gRPC call when the last one ends.

    Every call sends one of `messages` (serialized protobuf) to `method`; the answer must carry
    `expected_bytes` of gRPC message. Latencies of calls started inside `window` are recorded.
    Flow control is honoured both ways; server PINGs and SETTINGS are acknowledged.
    """

    def __init__(self, authority: str, method: str, messages: Sequence[bytes], expected_bytes: int, users: int,
                 window: Window, done: asyncio.Future[None], first: int = 0) -> None:
        self._block = grpc_request_headers(authority, method)
        self._headers_head = struct.pack(">I", len(self._block))[1:] + bytes((_HEADERS, _END_HEADERS))
        self._bodies = [b"\x00" + struct.pack(">I", len(m)) + m for m in messages]
        self._expected = expected_bytes + 5
        self._users = users
        self._window = window
        self._done = done
        self._next = first
        self.sent = 0  # calls sent, whether inside the window or not
        self._buffer = bytearray()
        self._stream_id = 1
        self._streams: dict[int, list[int]] = {}  # id -> [start_ns, received message bytes]
        self._active = 0
        self._max_frame = 16384
        self._send_window = 65535
        self._initial_window = 65535
        self._stream_windows: dict[int, int] = {}
        self._pending: list[list[Any]] = []  # [stream id, memoryview of what is left to send]
        self._unacked = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, _MAX_WINDOW)  # no push, big stream windows
        transport.write(_H2_PREFACE + _frame(_SETTINGS, 0, 0, settings)  # type: ignore[attr-defined]
                        + _frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", _MAX_WINDOW - 65535)))
        self._active = self._users
        for _ in range(self._users):
            self._send()

    def _send(self) -> None:
        stream = self._stream_id
        self._stream_id += 2
        body = self._bodies[self._next % len(self._bodies)]
        self._next += 1
        self.sent += 1
        self._streams[stream] = [time.perf_counter_ns(), 0]
        sid = struct.pack(">I", stream)
        n = len(body)
        if n <= self._max_frame and n <= self._send_window and n <= self._initial_window and not self._pending:
            self._send_window -= n
            self._transport.write(b"".join((self._headers_head, sid, self._block,  # type: ignore[union-attr]
                                            struct.pack(">I", n)[1:], b"\x00\x01", sid, body)))
            return
        self._transport.write(self._headers_head + sid + self._block)  # type: ignore[union-attr]
        self._stream_windows[stream] = self._initial_window
        self._pending.append([stream, memoryview(body)])
        self._flush()

    def _flush(self) -> None:
        out = []
        while self._pending:
            stream, rest = self._pending[0]
            n = min(len(rest), self._max_frame, self._send_window, self._stream_windows[stream])
            if n <= 0:
                break
            last = n == len(rest)
            out.append(_frame(_DATA, _END_STREAM if last else 0, stream, bytes(rest[:n])))
            self._send_window -= n
            self._stream_windows[stream] -= n
            if last:
                self._pending.pop(0)
                del self._stream_windows[stream]
            else:
                self._pending[0][1] = rest[n:]
        if out:
            self._transport.write(b"".join(out))  # type: ignore[union-attr]

    def _finish(self, stream: int, failure: str | None) -> None:
        entry = self._streams.pop(stream, None)
        if entry is None:
            return
        now = time.perf_counter_ns()
        start, received = entry
        w = self._window
        if w.start_ns <= start < w.stop_ns:
            if failure is None and received != self._expected:
                failure = f"answer of {received - 5} message bytes, expected {self._expected - 5} (an error status?)"
            if failure is None:
                w.latencies_ns.append(now - start)
            else:
                w.failures.append(failure)
        if now < w.stop_ns and self._transport is not None and not self._transport.is_closing():
            self._send()
            return
        self._active -= 1
        if self._active <= 0 and not self._done.done():
            self._done.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if end - pos < 9 + length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            body = pos + 9
            pos = body + length
            if kind == _DATA:
                entry = self._streams.get(stream)
                if entry is not None:
                    entry[1] += length - (buf[body] + 1 if flags & _PADDED else 0)
                self._unacked += length
                if flags & _END_STREAM:
                    self._finish(stream, None)
            elif kind == _HEADERS:
                if flags & _END_STREAM:
                    self._finish(stream, None)
            elif kind == _WINDOW_UPDATE:
                increment = int.from_bytes(buf[body : body + 4], "big") & 0x7FFFFFFF
                if stream == 0:
                    self._send_window += increment
                elif stream in self._stream_windows:
                    self._stream_windows[stream] += increment
                if self._pending:
                    self._flush()
            elif kind == _SETTINGS and not flags & _ACK:
                self._settings(bytes(buf[body:pos]))
            elif kind == _PING and not flags & _ACK:
                self._transport.write(_frame(_PING, _ACK, 0, bytes(buf[body:pos])))  # type: ignore[union-attr]
            elif kind == _RST_STREAM:
                self._finish(stream, f"RST_STREAM error code {int.from_bytes(buf[body:body + 4], 'big')}")
            elif kind == _GOAWAY:
                for open_stream in list(self._streams):
                    self._finish(open_stream, "GOAWAY from the server")
        del buf[:pos]
        if self._unacked > 1 << 28:
            self._transport.write(_frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", self._unacked)))  # type: ignore[union-attr]
            self._unacked = 0

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - 5, 6):
            ident, value = struct.unpack_from(">HI", payload, offset)
            if ident == 0x4:
                delta, self._initial_window = value - self._initial_window, value
                for stream in self._stream_windows:
                    self._stream_windows[stream] += delta
            elif ident == 0x5:
                self._max_frame = value
        self._transport.write(_frame(_SETTINGS, _ACK, 0))  # type: ignore[union-attr]
        if self._pending:
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for stream in list(self._streams):
            start = self._streams.pop(stream)[0]
            if self._window.start_ns <= start < self._window.stop_ns:
                self._window.failures.append(f"connection lost: {exc or 'closed by the server'}")
        self._transport = None
        if not self._done.done():
            self._done.set_result(None)
