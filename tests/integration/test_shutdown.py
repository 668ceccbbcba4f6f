"""Graceful shutdown (issue 6): `hedge serve` as a real process, SIGTERM while streams are in flight.

The simulated providers run in the test process (slow streams: 40 tokens, 50 ms apart), the gateway in a
subprocess from a TOML file. At SIGTERM the gateway must stop accepting at once, let the streams it is
serving run to `data: [DONE]`, and exit 0 within the grace period; streams that outlive the grace period
are ended (with an error event, so the client knows the answer is incomplete) and the exit is still 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from hedge.simprovider import Behaviour

from ..conftest import chat, raw_config, sims

DONE = b"data: [DONE]\n\n"
SLOW = Behaviour(tokens=40, token_gap=0.05)  # ~2 s per stream


def to_toml(d: dict[str, Any]) -> str:
    """The few TOML shapes our configs use (tables, strings, numbers, bools, lists), all inline."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    return "".join(f"{json.dumps(k)} = {val(v)}\n" for k, v in d.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m hedge serve` in a subprocess; stderr (its log) is drained by a thread into `lines`,
    so the pipe can never fill up and block the server."""

    def __init__(
        self, config: dict[str, Any], tmp: Path, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        path = tmp / "hedge.toml"
        path.write_text(to_toml(config))
        env = {**os.environ, "HEDGE_API_KEYS": "", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hedge", "serve", "--config", str(path), "--port", str(self.port), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent.parent,
        )
        self.lines: list[str] = []
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines[-40:])

    async def wait_listening(self, count: int = 1, timeout: float = 20.0) -> None:
        """Until `count` processes logged "listening" and the port answers /healthz."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"hedge serve exited with {self.proc.returncode}:\n{self.log()}")
            if sum("listening on" in line for line in self.lines) >= count:
                try:
                    async with aiohttp.ClientSession() as s, s.get(self.url + "/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"hedge serve did not start:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        try:
            await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            raise AssertionError(f"hedge serve still running after {timeout} s:\n{self.log()}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._drain.join(5)


@contextmanager
def serve(
    config: dict[str, Any], tmp: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[ServeProcess]:
    p = ServeProcess(config, tmp, *extra, env=env)
    try:
        yield p
    finally:
        p.kill()


def refuses(port: int) -> bool:
    """True when nothing accepts on the port any more."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except (ConnectionRefusedError, TimeoutError):
        return True


async def open_stream(http: aiohttp.ClientSession, url: str) -> tuple[aiohttp.ClientResponse, bytes]:
    """POST a stream and wait for its first content bytes, so it is surely in flight."""
    r = await http.post(url + "/v1/chat/completions", json=chat("m/slow"))
    assert r.status == 200, await r.text()
    first = await r.content.readany()
    return r, first


async def finish(r: aiohttp.ClientResponse, first: bytes) -> bytes:
    """The rest of the stream; a connection cut without the chunked terminator shows as `<cut>`."""
    out = bytearray(first)
    try:
        async for chunk in r.content.iter_any():
            out += chunk
    except aiohttp.ClientPayloadError:
        out += b"<cut>"
    finally:
        r.release()
    return bytes(out)


async def test_sigterm_lets_inflight_streams_finish(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    async with sims(("slow", SLOW)) as ps:
        cfg = raw_config({"slow": ps["slow"].base_url}, server={"shutdown_grace_s": 15})
        with serve(cfg, tmp_path) as gw:
            await gw.wait_listening()
            streams = [await open_stream(http, gw.url) for _ in range(3)]
            t_term = time.monotonic()
            gw.signal(signal.SIGTERM)
            tasks = [asyncio.ensure_future(finish(r, first)) for r, first in streams]

            # new connections are refused while the old streams are still running
            refused_at = None
            for _ in range(100):
                if await asyncio.to_thread(refuses, gw.port):
                    refused_at = time.monotonic()
                    break
                await asyncio.sleep(0.02)
            assert refused_at is not None, "still accepting after SIGTERM"
            assert not all(t.done() for t in tasks), "streams ended before the listener closed"

            bodies = await asyncio.gather(*tasks)
            for body in bodies:
                assert body.endswith(DONE), body[-300:]
                assert body.count(b'"content":"slow#') == 40  # every token, nothing cut
            assert await gw.wait_exit(timeout=15) == 0
            exited = time.monotonic() - t_term
            assert exited < 15, "exited after the grace period"
            assert ps["slow"].completed_total == 3
            assert any("shutting down" in line for line in gw.lines), gw.log()


async def test_sigterm_ends_streams_that_outlive_the_grace_period(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    endless = Behaviour(tokens=400, token_gap=0.05)  # 20 s: far beyond the 1 s grace
    async with sims(("slow", endless)) as ps:
        cfg = raw_config({"slow": ps["slow"].base_url}, server={"shutdown_grace_s": 1.0})
        with serve(cfg, tmp_path) as gw:
            await gw.wait_listening()
            streams = [await open_stream(http, gw.url) for _ in range(2)]
            t_term = time.monotonic()
            gw.signal(signal.SIGTERM)
            bodies = await asyncio.gather(*(finish(r, first) for r, first in streams))
            assert await gw.wait_exit(timeout=15) == 0
            took = time.monotonic() - t_term
            for body in bodies:
                assert DONE not in body
                last = [e for e in body.split(b"\n\n") if e][-1]
                assert last.startswith(b'data: {"error"'), body[-300:]
                assert orjson.loads(last[6:])["error"]["code"] == "shutting_down"
            # the grace period (1 s) bounds the wait, not the streams (20 s); generous for a busy box
            assert took < 8, took
        # the gateway hung up on the provider too: nothing keeps generating for nobody
        assert await _eventually_async(lambda: all(r.ended for r in ps["slow"].records))
        assert ps["slow"].completed_total == 0


async def test_sigint_idle_exits_zero(tmp_path: Path) -> None:
    async with sims(("slow", SLOW)) as ps:
        with serve(raw_config({"slow": ps["slow"].base_url}), tmp_path) as gw:
            await gw.wait_listening()
            gw.signal(signal.SIGINT)
            assert await gw.wait_exit(timeout=10) == 0


async def _eventually_async(pred: Any, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


async def test_sigterm_answers_requests_still_racing_with_a_503(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # no first token within the 1 s grace: nothing was committed, so the caller gets a clear,
    # retryable answer (503 + Retry-After) instead of a connection cut without a response
    async with sims(("slow", Behaviour(ttft=20.0))) as ps:
        cfg = raw_config({"slow": ps["slow"].base_url}, server={"shutdown_grace_s": 1.0})
        with serve(cfg, tmp_path) as gw:
            await gw.wait_listening()
            pending = [
                asyncio.ensure_future(
                    http.post(gw.url + "/v1/chat/completions", json=chat("m/slow", stream=s))
                )
                for s in (True, False)
            ]
            assert await _eventually_async(lambda: len(ps["slow"].records) == 2)
            gw.signal(signal.SIGTERM)
            for fut in pending:
                r = await asyncio.wait_for(fut, 15)
                assert r.status == 503, await r.text()
                assert r.headers["Retry-After"] == "1"
                err = (await r.json())["error"]
                assert err["code"] == "shutting_down" and set(err) == {"message", "type", "param", "code"}
            assert await gw.wait_exit(timeout=15) == 0
        assert await _eventually_async(lambda: all(r.ended for r in ps["slow"].records))
