"""Provider keys never reach a client through a committed stream, and nothing else in it changes.

The README promises provider keys are scrubbed from any upstream text we pass on. After commit the proxy
forwards a stream's bytes without parsing its events, so the forwarder itself looks for the winning
provider's key in every chunk (see hedge/secrets.py). Real servers on 127.0.0.1: a simulated provider that
echoes the key in its content, and a hand-written one that sends it in an in-stream error event, split
across two writes.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from hedge.server import bound_port
from hedge.simprovider import Behaviour

from ..conftest import chat, raw_config, read_stream, run_proxy, same_stream, sims

KEY = "sk-test-0123456789abcdefSECRET"
ENV = "HEDGE_TEST_STREAM_KEY"
URL = "/v1/chat/completions"


@pytest.fixture(autouse=True)
def provider_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)


def with_key(raw: dict, name: str) -> dict:
    raw["providers"][name]["api_key_env"] = ENV
    return raw


async def test_a_key_echoed_in_streamed_content_is_redacted(http: aiohttp.ClientSession) -> None:
    echo = Behaviour(text=f"you sent {KEY} as your key", tokens=6)
    async with sims(("a", echo)) as ps:
        async with run_proxy(with_key(raw_config({"a": ps["a"].base_url}), "a")) as px:
            async with http.post(px.url + URL, json=chat("m/a")) as r:
                assert r.status == 200
                body = await read_stream(r)
            sent = ps["a"].records[-1].sent  # what the provider wrote, byte for byte
            assert KEY.encode() in bytes(sent)
            assert KEY.encode() not in body
            assert b'"content":"[redacted] "' in body
            # apart from the key, the client got the provider's bytes
            assert same_stream(body, bytes(sent).replace(KEY.encode(), b"[redacted]"))

            # a stream without the key is untouched (the scrub is no edit unless the key is there)
            ps["a"].behaviour = Behaviour(text="nothing secret sk-test- here", tokens=4)
            async with http.post(px.url + URL, json=chat("m/a")) as r:
                body = await read_stream(r)
            assert same_stream(body, bytes(ps["a"].records[-1].sent))


async def test_a_key_in_an_in_stream_error_event_is_redacted_even_split_across_reads(
    http: aiohttp.ClientSession,
) -> None:
    half = len(KEY) // 2

    async def provider(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
        event = f'data: {{"error":{{"message":"invalid key {KEY}","type":"auth"}}}}\n\n'.encode()
        cut = event.index(KEY.encode()) + half
        await resp.write(event[:cut])
        await asyncio.sleep(0.05)  # so the proxy most likely reads the event in two pieces
        await resp.write(event[cut:])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post(URL, provider)
    runner = web.AppRunner(app)  # a plain provider app: hedge's start_site expects the proxy's app
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{bound_port(runner)}/v1"
        async with run_proxy(with_key(raw_config({"a": base}), "a")) as px:
            async with http.post(px.url + URL, json=chat("m/a")) as r:
                assert r.status == 200
                body = await read_stream(r)
    finally:
        await runner.cleanup()
    assert KEY.encode() not in body
    assert KEY.encode()[:half] not in body and KEY.encode()[half:] not in body
    assert b'"message":"invalid key [redacted]"' in body
    assert body.startswith(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
    assert b"stream_truncated" in body  # no [DONE]: the proxy says so after the provider's event
