"""``python -m loadtest abuse``: issue 13's attacks against a real `hedge serve`, with what they cost it.

Every attack runs against a fresh gateway process (so its peak RSS, VmHWM from /proc, belongs to that
attack alone) with one simulated provider in this process, all on 127.0.0.1. While an attack runs, a
probe sends `GET /healthz` every 20 ms on a keep-alive connection opened *before* the attack (so the
connection limit does not refuse the probe itself) and samples the gateway's open file descriptors.
After it: the fds must come back to their baseline and the gateway's log must hold no ERROR line.

The attacks (numbers as in the issue):

1. `compressed-messages`: a gzip body of N tiny messages (2,000,000 in ~50 KB by default), P at once.
   `zip-bomb`: a gzip of M MiB of zeros.
2. `slowloris`: N connections sending a request head one byte per second.
   `half-open`: N connections that each send 47 bytes of a head and wait.
3. `slow-uploads`: N authenticated uploads that stall after 10 bytes of the body, while normal chat
   requests must still get 200.
4. `bad-compression`: requests with `Content-Encoding: gzip` on a plain body (with and without a key), and
   an unknown coding.

The same functions run, scaled down, in tests/system/test_abuse.py, which asserts the bounds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gzip
import os
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from hedge.simprovider import Behaviour, SimProvider

from .procs import Children, free_port, log_tail, status_kb, wait_http
from .run import _toml_value

KEY = "sk-abuse-key"
CHAT = "/v1/chat/completions"
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")


def gateway_toml(provider_url: str, port: int, server: dict[str, Any]) -> str:
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in server.items()]
    lines += ["", "[providers.a]", f"base_url = {_toml_value(provider_url)}", ""]
    lines += ['[models."m/a"]', "input_usd_per_mtok = 1.0", "output_usd_per_mtok = 2.0"]
    lines += ["context_window = 128000", "max_output_tokens = 4096"]
    lines += ['serve = [{ provider = "a", model = "up-a" }]', ""]
    return "\n".join(lines)


@dataclass
class Gateway:
    """A `hedge serve` child process and what /proc says about it."""

    pid: int
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return -1

    def rss_kb(self) -> int:
        return status_kb(self.pid, "VmRSS") or 0

    def peak_rss_kb(self) -> int:
        return status_kb(self.pid, "VmHWM") or 0

    def error_lines(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if ERROR_LINE.search(line)]

    def log_bytes(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0


@asynccontextmanager
async def gateway(server: dict[str, Any], workdir: Path) -> AsyncIterator[Gateway]:
    """A fresh gateway with `[server]` overrides, gateway key `KEY`, one simulated provider."""
    prov = SimProvider("a", Behaviour(tokens=3))
    prov.keep_records = False
    await prov.start()
    try:
        os.makedirs(workdir, exist_ok=True)
        port = free_port()
        cfg = workdir / "abuse.toml"
        cfg.write_text(gateway_toml(prov.base_url, port, server))
        log = workdir / f"gateway-{port}.log"
        env = {**os.environ, "HEDGE_API_KEYS": KEY, "PYTHONUNBUFFERED": "1"}
        with Children() as kids:
            proc = kids.spawn(
                "gateway", ["-m", "hedge", "serve", "--config", str(cfg)], log_path=log, env=env
            )
            await wait_http(f"http://127.0.0.1:{port}/healthz", proc, log=log)
            yield Gateway(proc.pid, port, log)
    finally:
        await prov.stop()


# ------------------------------------------------------------------------------------------ the probe


@dataclass
class Probe:
    """/healthz latency on a connection opened before the attack, and the gateway's fd count."""

    gw: Gateway
    interval: float = 0.02
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    fd_peak: int = 0
    _task: asyncio.Task[None] | None = None
    _stop: bool = False

    async def sample(self, n: int) -> list[float]:
        """`n` probes now (the baseline before an attack)."""
        out: list[float] = []
        reader, writer = await _connect(self.gw.port)
        try:
            for _ in range(n):
                async with asyncio.timeout(10):
                    out.append(await _healthz(reader, writer))
        finally:
            writer.close()
        return out

    async def _run(self) -> None:
        # asyncio.timeout rather than wait_for: on 3.11 wait_for can swallow the cancel that ends the
        # probe (when its inner await finishes in the same instant), and this loop would run forever
        reader, writer = await _connect(self.gw.port)
        k = 0
        try:
            while not self._stop:
                try:
                    async with asyncio.timeout(10):
                        self.latencies.append(await _healthz(reader, writer))
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                    self.failures += 1
                    writer.close()
                    with contextlib.suppress(OSError, TimeoutError):
                        reader, writer = await _connect(self.gw.port)
                if k % 5 == 0:
                    self.fd_peak = max(self.fd_peak, self.gw.fds())
                k += 1
                await asyncio.sleep(self.interval)
        finally:
            writer.close()

    async def __aenter__(self) -> Probe:
        self._task = asyncio.ensure_future(self._run())
        await asyncio.sleep(self.interval * 2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._stop = True
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    @property
    def worst(self) -> float:
        return max(self.latencies, default=float("inf"))


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(10):
        return await asyncio.open_connection("127.0.0.1", port)


async def _healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    t0 = time.perf_counter()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
    if not head.startswith(b"HTTP/1.1 200") or m is None:
        raise ValueError(head[:100])
    await reader.readexactly(int(m.group(1)))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------- the attacks


@dataclass
class Outcome:
    """What one attack did to the gateway."""

    attack: str
    size: str
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    rss_before_mb: float = 0.0
    peak_rss_mb: float = 0.0
    healthz_base_ms: float = 0.0
    healthz_worst_ms: float = 0.0
    healthz_failures: int = 0
    fds_before: int = 0
    fds_peak: int = 0
    fds_after: int = 0
    error_lines: int = 0
    log_bytes: int = 0
    log_growth: int = 0  # bytes the gateway logged while the attack ran
    seconds: float = 0.0
    notes: str = ""


async def _post(s: aiohttp.ClientSession, url: str, data: bytes, headers: dict[str, str]) -> str:
    try:
        async with s.post(url + CHAT, data=data, headers=headers, timeout=aiohttp.ClientTimeout(60)) as r:
            body = await r.read()
            code = orjson.loads(body)["error"]["code"] if r.status >= 400 else ""
            return f"{r.status} {code}".strip()
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        return type(e).__name__


@functools.lru_cache(maxsize=2)
def compressed_messages_body(n: int) -> bytes:
    body = b'{"model":"m/a","stream":true,"messages":[' + b",".join([b'{"role":"u"}'] * n) + b"]}"
    return gzip.compress(body, 9)


@functools.lru_cache(maxsize=2)
def zip_bomb_body(mib: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    out = [z.compress(zeros) for _ in range(mib)]
    out.append(z.flush())
    return b"".join(out)


GZ_HEADERS = {
    "Authorization": f"Bearer {KEY}",
    "Content-Type": "application/json",
    "Content-Encoding": "gzip",
}


async def compressed_messages(gw: Gateway, out: Outcome, n: int = 2_000_000, parallel: int = 4) -> None:
    body = compressed_messages_body(n)
    out.notes = f"{len(body) // 1024} KB gzip -> {n * 13 // (1 << 20)} MB JSON, {parallel} at once"
    async with aiohttp.ClientSession() as s:
        for st in await asyncio.gather(*(_post(s, gw.url, body, GZ_HEADERS) for _ in range(parallel))):
            out.statuses[st] += 1


async def zip_bomb(gw: Gateway, out: Outcome, mib: int = 1024, parallel: int = 1) -> None:
    body = zip_bomb_body(mib)
    out.notes = f"{len(body) // 1024} KB gzip of {mib} MiB of zeros, {parallel} at once"
    async with aiohttp.ClientSession() as s:
        for st in await asyncio.gather(*(_post(s, gw.url, body, GZ_HEADERS) for _ in range(parallel))):
            out.statuses[st] += 1


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A connection, or None if the connect fails or takes over 10 s (a SYN dropped in a burst is
    retried by the kernel after 1, 3, 7 ... s)."""
    try:
        return await _connect(port)
    except (OSError, TimeoutError):
        return None


async def _closed_by_peer(reader: asyncio.StreamReader, within: float) -> tuple[bool, bytes]:
    """Wait until the gateway closes the connection (EOF or reset); return (closed, bytes it sent)."""
    got = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(4096):
                got += chunk
        return True, got
    except (ConnectionError, OSError):
        return True, got
    except TimeoutError:
        return False, got


async def slowloris(gw: Gateway, out: Outcome, n: int = 300, within: float = 30.0) -> None:
    """N connections, each sending its head one byte a second; how long until the gateway closes them."""
    t0 = time.perf_counter()
    conns = [c for c in await asyncio.gather(*(_open(gw.port) for _ in range(n))) if c is not None]
    closed_at: list[float] = []

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        watch = asyncio.ensure_future(_closed_by_peer(reader, within))
        try:
            for b in HEAD:
                if watch.done():
                    break
                writer.write(bytes([b]))
                await asyncio.sleep(1.0)
            closed, got = await watch
        except (ConnectionError, OSError):
            closed, got = True, b""
        finally:
            writer.close()
        if closed:
            closed_at.append(time.perf_counter() - t0)
        return "refused 503" if got.startswith(b"HTTP/1.1 503") else ("closed" if closed else "still open")

    for st in await asyncio.gather(*(drip(r, w) for r, w in conns)):
        out.statuses[st] += 1
    out.statuses["connect failed"] += n - len(conns)
    out.notes = f"{n} sockets at 1 byte/s; last closed after {max(closed_at, default=0):.1f} s"


async def half_open(gw: Gateway, out: Outcome, n: int = 20_000, within: float = 30.0) -> None:
    """N connections that each send 47 bytes of a request head (no key) and then nothing."""
    t0 = time.perf_counter()
    partial = HEAD[:47]
    sem = asyncio.Semaphore(200)  # connects in flight at once: bursts beyond loopback's queue drop SYNs
    closed_at: list[float] = []

    async def one() -> str:
        async with sem:
            c = await _open(gw.port)
            if c is None:
                return "connect failed"
            reader, writer = c
            try:
                writer.write(partial)
            except (ConnectionError, OSError):
                return "refused"
        closed, got = await _closed_by_peer(reader, within)
        writer.close()
        if closed:
            closed_at.append(time.perf_counter() - t0)
        if got.startswith(b"HTTP/1.1 503"):
            return "refused 503"
        return "closed" if closed else "still open"

    for st in await asyncio.gather(*(one() for _ in range(n))):
        out.statuses[st] += 1
    out.notes = f"{n} connections x 47 bytes; last closed after {max(closed_at, default=0):.1f} s"


async def slow_uploads(
    gw: Gateway, out: Outcome, n: int = 2000, normal: int = 20, within: float = 30.0
) -> None:
    """N authenticated uploads stalled after 10 body bytes; meanwhile `normal` chat requests must pass."""
    head = HEAD + f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"model":'
    sem = asyncio.Semaphore(200)
    stalled: list[asyncio.StreamReader] = []

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        async with sem:
            c = await _open(gw.port)
            if c is not None:
                c[1].write(head)
            return c

    conns = [c for c in await asyncio.gather(*(one() for _ in range(n))) if c is not None]
    stalled = [r for r, _ in conns]
    await asyncio.sleep(0.5)  # the uploads are in; if they held slots, normal requests would get 503 now
    body = orjson.dumps({"model": "m/a", "messages": [{"role": "user", "content": "hi"}]})
    hdr = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        for st in await asyncio.gather(*(_post(s, gw.url, body, hdr) for _ in range(normal))):
            out.statuses["normal " + st] += 1

    async def ended(reader: asyncio.StreamReader) -> str:
        closed, got = await _closed_by_peer(reader, within)
        m = re.match(rb"HTTP/1.1 (\d+)", got)
        return "upload " + (m.group(1).decode() if m else ("closed" if closed else "still open"))

    for st in await asyncio.gather(*(ended(r) for r in stalled)):
        out.statuses[st] += 1
    for _, w in conns:
        w.close()
    out.notes = f"{len(conns)} uploads stalled after 10 bytes; {normal} normal requests meanwhile"


async def bad_compression(gw: Gateway, out: Outcome, n: int = 200) -> None:
    """Plain bodies labelled gzip/deflate (with and without a key) and unknown codings: 400/401/415."""
    plain = orjson.dumps({"model": "m/a", "messages": [{"role": "user", "content": "hi"}]})
    log0 = gw.log_bytes()
    variants = [
        {**GZ_HEADERS},
        {**GZ_HEADERS, "Content-Encoding": "deflate"},
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},  # no key
        {**GZ_HEADERS, "Content-Encoding": "br"},
    ]
    async with aiohttp.ClientSession() as s:
        tasks = [_post(s, gw.url, plain, variants[i % len(variants)]) for i in range(n)]
        for st in await asyncio.gather(*tasks):
            out.statuses[st] += 1
    await asyncio.sleep(0.2)
    out.notes = f"{n} requests; the log grew {gw.log_bytes() - log0} bytes"


Attack = Callable[..., Awaitable[None]]

# name -> (function, full-size keyword arguments, [server] config for the run)
ATTACKS: dict[str, tuple[Attack, dict[str, Any], dict[str, Any]]] = {
    "compressed-messages": (compressed_messages, {"n": 2_000_000, "parallel": 4}, {}),
    "zip-bomb": (zip_bomb, {"mib": 1024}, {}),
    "slowloris": (slowloris, {"n": 300}, {"header_timeout_s": 10.0}),
    "half-open": (half_open, {"n": 20_000}, {"header_timeout_s": 10.0}),
    "slow-uploads": (slow_uploads, {"n": 2000}, {"body_timeout_s": 5.0, "max_concurrency": 100}),
    "bad-compression": (bad_compression, {"n": 400}, {}),
}


async def run_attack(
    name: str, workdir: Path, server: dict[str, Any] | None = None, *, limit: float = 600.0, **kwargs: Any
) -> Outcome:
    """One attack against a fresh gateway; `server` and `kwargs` override the full-size defaults; the
    attack may take `limit` seconds at most."""
    fn, size, srv = ATTACKS[name]
    size = {**size, **kwargs}
    out = Outcome(name, ", ".join(f"{k}={v}" for k, v in size.items()))
    # bodies are built before the gateway starts: building them must not stall the probe's own loop
    if name == "compressed-messages":
        compressed_messages_body(size["n"])
    elif name == "zip-bomb":
        zip_bomb_body(size["mib"])
    async with gateway({**srv, **(server or {})}, workdir / name) as gw:
        probe = Probe(gw)
        base = await probe.sample(20)
        await asyncio.sleep(0.2)
        out.healthz_base_ms = sorted(base)[len(base) // 2] * 1000
        out.fds_before = gw.fds()
        out.rss_before_mb = gw.rss_kb() / 1024
        t0 = time.perf_counter()
        log0 = gw.log_bytes()
        async with probe, asyncio.timeout(limit):  # no attack may hang the run
            await fn(gw, out, **size)
        out.log_growth = gw.log_bytes() - log0
        out.seconds = time.perf_counter() - t0
        out.peak_rss_mb = gw.peak_rss_kb() / 1024
        out.healthz_worst_ms = probe.worst * 1000
        out.healthz_failures = probe.failures
        out.fds_peak = max(probe.fd_peak, out.fds_before)
        out.fds_after = await settle_fds(gw, out.fds_before)
        out.error_lines = len(gw.error_lines())
        out.log_bytes = gw.log_bytes()
    return out


async def settle_fds(gw: Gateway, baseline: int, within: float = 10.0) -> int:
    """The gateway's fd count once it is back at `baseline` (or whatever it is after `within` s)."""
    end = time.monotonic() + within
    while (n := gw.fds()) > baseline and time.monotonic() < end:  # noqa: ASYNC110 (polling /proc)
        await asyncio.sleep(0.05)
    return n


def table(outcomes: list[Outcome]) -> str:
    rows = [
        "| attack | size | answers | peak RSS (MB, idle) | /healthz worst (ms, idle p50) | fds peak → after "
        "(before) | ERROR lines |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(o.statuses.items()))
        rows.append(
            f"| {o.attack} | {o.notes} | {answers} | {o.peak_rss_mb:.0f} ({o.rss_before_mb:.0f}) | "
            f"{o.healthz_worst_ms:.0f} ({o.healthz_base_ms:.1f}) | {o.fds_peak} → {o.fds_after} "
            f"({o.fds_before}) | {o.error_lines} |"
        )
    return "\n".join(rows)


async def main(names: list[str], workdir: Path, scale: float = 1.0) -> int:
    from hedge.conn_limits import raise_nofile_limit

    raise_nofile_limit()  # this process holds the attack's sockets
    outcomes = []
    for name in names:
        _, size, _ = ATTACKS[name]
        scaled = {k: max(1, int(v * scale)) if k in ("n", "mib") else v for k, v in size.items()}
        try:
            o = await run_attack(name, workdir, None, **scaled)
        except Exception as e:  # report and go on with the next attack
            print(f"{name}: failed: {e}\n{log_tail(workdir / name / 'x')}")
            continue
        print(table([o]).splitlines()[-1], flush=True)
        outcomes.append(o)
    print()
    print(table(outcomes))
    return 0
