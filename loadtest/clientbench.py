"""The upstream client benchmark: ``python -m loadtest client``.

Two phases against the simulated provider (instant profile: 20 content chunks, zero latency, in its
own process), each printing a figure against a baseline from the same run:

* parse: responses recorded from the provider, piece by piece as the socket delivered them, are fed
  through the lean client's protocol path (`_Conn.data_received` -> llhttp parser -> reply queue ->
  `read`) in this process, with no socket: CPU per response and per piece. The baseline is the same
  streams fed to llhttp alone (httptools with no-op callbacks), so "overhead over raw llhttp" shows
  what our Python around the C parser costs.
* client: end-to-end streaming requests through each upstream client (`fast`, `aiohttp`) at the given
  concurrency, alternating rounds; this process's CPU per request, and the ratio fast/aiohttp.

The machine is usually shared (provider and client compete for cores): CPU time per request, not
wall time, is the figure to compare, and ratios from one run, not numbers across runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

from hedge.fastclient import FastUpstream, _Conn
from hedge.upstream import make_client

from .procs import Children, read_ready_line
from .run import child_env

HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}


def request_body(seq: int) -> bytes:
    return orjson.dumps(
        {
            "model": "up-model",
            "stream": True,
            "messages": [{"role": "user", "content": "Say hello."}],
            "user": f"lt/clientbench/{seq}",
        }
    )


# ------------------------------------------------------------------------------------- recording


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.pieces.append(data)
        if data.endswith(b"0\r\n\r\n") and not self.done.done():  # the chunked body's last chunk
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def record(url: str, n: int) -> list[list[bytes]]:
    """`n` streaming responses as received: each a list of the pieces `data_received` got."""
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    lines = [f"POST {u.path} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in HEADERS.items())]
    head = ("\r\n".join(lines) + "\r\n").encode()
    loop = asyncio.get_running_loop()
    out: list[list[bytes]] = []
    for i in range(n):
        body = request_body(i)
        transport, proto = await loop.create_connection(_Recorder, host, port)
        transport.write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
        await asyncio.wait_for(proto.done, 10.0)
        transport.close()
        out.append(proto.pieces)
    return out


# ----------------------------------------------------------------------------------------- parse


class _FakeTransport:
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def abort(self) -> None: ...
    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None: ...


@dataclass
class ParsePath:
    """How to drive one implementation of the receive path (the benchmark can be pointed at another)."""

    new_conn: Callable[[], Any]
    drain: Callable[[Any], Awaitable[int]]
    reset: Callable[[Any], None]


def lean_client_path() -> ParsePath:
    def new_conn() -> _Conn:
        conn = _Conn(FastUpstream(), ("127.0.0.1", 1, False))
        conn.connection_made(_FakeTransport())  # type: ignore[arg-type]
        return conn

    async def drain(conn: _Conn) -> int:
        n = 0
        while conn.reply.queued:
            n += len(await conn.reply.read())
        return n

    return ParsePath(new_conn, drain, lambda c: c.reset())


async def time_path(streams: list[list[bytes]], path: ParsePath, rounds: int) -> float:
    """CPU seconds per response: every stream fed piece by piece, drained after each piece, on one
    connection reset between responses (as the pool does)."""
    conn = path.new_conn()
    total = 0
    t0 = time.process_time()
    for _ in range(rounds):
        for pieces in streams:
            for p in pieces:
                conn.data_received(p)
                total += await path.drain(conn)
            path.reset(conn)
    elapsed = time.process_time() - t0
    if total == 0:
        raise RuntimeError("the receive path produced no body bytes")
    return elapsed / (rounds * len(streams))


async def check_streams(streams: list[list[bytes]]) -> None:
    """Every recorded response must come out of the receive path whole: a benchmark of a parser that
    lost the body would measure nothing."""
    conn = lean_client_path().new_conn()
    for pieces in streams:
        out = b""
        for p in pieces:
            conn.data_received(p)
            while conn.reply.queued:
                out += await conn.reply.read()
        if not (conn.reply.done and out.endswith(b"data: [DONE]\n\n")):
            raise RuntimeError(f"recorded stream did not parse to a complete body: {out[-80:]!r}")
        conn.reset()


class _NoOp:
    def on_header(self, name: bytes, value: bytes) -> None: ...
    def on_headers_complete(self) -> None: ...
    def on_body(self, body: bytes) -> None: ...
    def on_message_complete(self) -> None: ...


def time_llhttp(streams: list[list[bytes]], rounds: int) -> float:
    """CPU seconds per response for llhttp alone (httptools, no-op callbacks, a parser per response)."""
    sink = _NoOp()
    t0 = time.process_time()
    for _ in range(rounds):
        for pieces in streams:
            p = httptools.HttpResponseParser(sink)
            for piece in pieces:
                p.feed_data(piece)
    return (time.process_time() - t0) / (rounds * len(streams))


# ---------------------------------------------------------------------------------------- client


async def _client_round(url: str, kind: str, n: int, concurrency: int, seq0: int) -> float:
    """CPU seconds per request for `n` streamed requests through client `kind`."""
    client = make_client(kind)
    it = iter(range(seq0, seq0 + n))

    async def worker() -> None:
        for seq in it:
            resp = await client.open(url, HEADERS, request_body(seq), connect_timeout=5, read_timeout=10)
            while await resp.read_chunk():
                pass
            resp.release()

    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, 4))))  # warm the pool
        it = iter(range(seq0, seq0 + n))
        t0 = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return (time.process_time() - t0) / n
    finally:
        await client.close()


async def run(requests: int, concurrency: int, rounds: int, streams: int) -> dict[str, Any]:
    children = Children()
    try:
        prov = children.spawn(
            "provider", ["-m", "loadtest.providers", "--scenario", "instant", "--max-lifetime", "600"],
            stdout_pipe=True, env=child_env(),
        )  # fmt: skip
        ready = orjson.loads(await read_ready_line(prov, 20.0, None))
        url = ready["providers"]["up"].rstrip("/") + "/chat/completions"
        recorded = await record(url, streams)
        await check_streams(recorded)
        pieces = sum(len(s) for s in recorded) / len(recorded)
        parse_rounds = max(1, 20_000 // len(recorded))
        ours = await time_path(recorded, lean_client_path(), parse_rounds)
        raw = time_llhttp(recorded, parse_rounds)
        cpu: dict[str, list[float]] = {"fast": [], "aiohttp": []}
        for r in range(rounds):
            order = ("fast", "aiohttp") if r % 2 == 0 else ("aiohttp", "fast")
            for kind in order:
                cpu[kind].append(
                    await _client_round(url, kind, requests // rounds, concurrency, r * requests)
                )
        med = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
        return {
            "pieces_per_response": pieces,
            "parse_us_per_response": ours * 1e6,
            "llhttp_us_per_response": raw * 1e6,
            "client_cpu_us_per_request": {k: v * 1e6 for k, v in med.items()},
            "client_cpu_ratio_fast_vs_aiohttp": med["fast"] / med["aiohttp"],
        }
    finally:
        children.close()


def render(res: dict[str, Any], concurrency: int) -> str:
    c = res["client_cpu_us_per_request"]
    return "\n".join(
        [
            f"parse: {res['pieces_per_response']:.1f} socket reads per recorded response",
            f"  lean client receive path  {res['parse_us_per_response']:8.1f} us CPU per response",
            f"  llhttp alone (baseline)   {res['llhttp_us_per_response']:8.1f} us CPU per response"
            f"   ratio {res['parse_us_per_response'] / res['llhttp_us_per_response']:.2f}x",
            f"client: streamed requests at concurrency {concurrency}, median over rounds",
            f"  fast     {c['fast']:8.1f} us CPU per request",
            f"  aiohttp  {c['aiohttp']:8.1f} us CPU per request (baseline)"
            f"   ratio fast/aiohttp {res['client_cpu_ratio_fast_vs_aiohttp']:.2f}x",
            "(this process only: the provider runs in its own; the machine may be shared)",
        ]
    )
