"""The simulated provider's Responses, completions and embeddings APIs: wire format, timing, faults and
state, with the official `openai` SDK as the client where it proves SDK compatibility."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from hedge.dialects import (
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    StreamDetector,
    Usage,
    end_at,
    event_cut,
    insert_cost,
    parse_json_body,
    take_usage,
)
from hedge.simformats import SENTENCES, embedding_vector, prose_words
from hedge.simprovider import MAX_STORED_RESPONSES, Behaviour, SimProvider

from .test_simprovider import EARLY, MakeProvider, make_provider, session

__all__ = ["make_provider", "session"]  # fixtures shared with the chat tests of the simulator
FAULTS = {
    "reset": "reset_after_tokens",
    "malformed": "malformed_after_tokens",
    "error": "error_event_after_tokens",
}


def sdk(p: SimProvider) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=p.base_url, api_key="sk-unused", max_retries=0)


def events(raw: bytes) -> list[dict[str, Any]]:
    """Responses SSE: every event has an `event:` line naming the same type as its data."""
    out = []
    for block in raw.split(b"\n\n")[:-1]:
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        event = orjson.loads(data[6:])
        assert event["type"] == name[7:].decode()
        out.append(event)
    return out


# ---------------------------------------------------------------------------------------- Responses


async def test_sdk_streams_a_response(make_provider: MakeProvider) -> None:
    p = await make_provider(Behaviour(tokens=4), prose=True)
    async with sdk(p) as client:
        stream = await client.responses.create(model="gpt-5-mini", input="Say hi", stream=True)
        seen = [ev async for ev in stream]
    types = [e.type for e in seen]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types.count("response.output_text.delta") == 4 and types[-1] == "response.completed"
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    text = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    final = seen[-1].response  # type: ignore[union-attr]
    assert final.output_text == text == "".join(prose_words("alpha/0", 4))
    assert text.split()[0] in " ".join(SENTENCES)  # prose, not `alpha#0:0`
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (10, 4)
    assert final.status == "completed" and final.id.startswith("resp_")
    assert p.records[0].api == "responses" and p.records[0].completed


async def test_sdk_stream_helper_accumulates_the_text(make_provider: MakeProvider) -> None:
    """The SDK's stateful `responses.stream()` needs output_item.added / content_part.added first."""
    p = await make_provider(Behaviour(tokens=3, text="one two three"))
    async with sdk(p) as client:
        async with client.responses.stream(model="m", input="x") as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_response()
    assert final.output_text == "one two three "


async def test_sdk_non_streaming_response_and_state(make_provider: MakeProvider) -> None:
    p = await make_provider(Behaviour(tokens=3, prompt_tokens=7))
    async with sdk(p) as client:
        r = await client.responses.create(model="gpt-5-mini", input="Say hi")
        assert r.output_text == "alpha#0:0 alpha#0:1 alpha#0:2 " and r.status == "completed"
        assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens) == (7, 3)
        again = await client.responses.retrieve(r.id)
        assert again.id == r.id and again.output_text == r.output_text
        items = await client.responses.input_items.list(r.id)
        assert [i.type for i in items.data] == ["message"]
        follow = await client.responses.create(model="gpt-5-mini", input="more", previous_response_id=r.id)
        assert follow.previous_response_id == r.id
        await client.responses.delete(r.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError) as e:  # the provider does not know the parent any more
            await client.responses.create(model="gpt-5-mini", input="x", previous_response_id=r.id)
        assert e.value.code == "previous_response_not_found"
    assert p.requests_total == 3  # the refused continuation was still a request the provider saw


async def test_unknown_previous_response_is_404_on_another_provider(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    a = await make_provider(Behaviour(tokens=1), name="a")
    b = await make_provider(Behaviour(tokens=1), name="b")
    async with session.post(a.base_url + "/responses", json={"model": "m", "input": "x"}) as resp:
        rid = (await resp.json())["id"]
        assert resp.headers["X-Sim-Provider"] == "a"
    body = {"model": "m", "input": "y", "previous_response_id": rid, "stream": True}
    async with session.post(b.base_url + "/responses", json=body) as resp:
        assert resp.status == 404
        err = (await resp.json())["error"]
        assert (err["param"], err["code"]) == ("previous_response_id", "previous_response_not_found")
    async with session.get(b.base_url + f"/responses/{rid}") as resp:
        assert resp.status == 404


async def test_created_at_once_first_delta_late(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    """A provider that announces the response at once and thinks long: the detector waits for the delta."""
    p = await make_provider(Behaviour(headers_delay=0.0, ttft=0.25, tokens=2))
    t0 = time.monotonic()
    async with session.post(
        p.base_url + "/responses", json={"model": "m", "input": "x", "stream": True}
    ) as resp:
        det = StreamDetector(RESPONSES)
        first = await resp.content.readuntil(b"\n\n")
        first += await resp.content.readuntil(b"\n\n")  # created and in_progress, together, at once
        t_open = time.monotonic() - t0
        assert [e["type"] for e in events(first)] == ["response.created", "response.in_progress"]
        assert det.feed(first) == 0
        rest = await resp.read()
    rec = p.records[0]
    assert rec.first_token_at is not None and rec.first_token_at - rec.arrived_at >= 0.25 - EARLY
    assert t_open < 0.2  # generous: the opening must not wait for the first token
    assert det.feed(rest) == 1
    assert events(first + rest)[-1]["type"] == "response.completed"


@pytest.mark.parametrize("fault", ["reset", "malformed", "error"])
async def test_responses_stream_faults(
    make_provider: MakeProvider, session: aiohttp.ClientSession, fault: str
) -> None:
    p = await make_provider(Behaviour(tokens=4, **{FAULTS[fault]: 0}))
    body = {"model": "m", "input": "x", "stream": True}
    try:
        async with session.post(p.base_url + "/responses", json=body) as resp:
            raw = await resp.read()
    except aiohttp.ClientPayloadError:
        assert fault == "reset"
        return
    assert fault != "reset"
    det = StreamDetector(RESPONSES)
    with pytest.raises(Exception) as e:
        det.feed(raw)
    assert getattr(e.value, "reason", None) == ("error_event" if fault == "error" else "malformed")
    assert not p.records[0].completed


async def test_store_false_and_stored_bound(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider(Behaviour(tokens=1))
    async with session.post(
        p.base_url + "/responses", json={"model": "m", "input": "x", "store": False}
    ) as resp:
        rid = (await resp.json())["id"]
    assert rid not in p.stored
    for i in range(MAX_STORED_RESPONSES + 5):
        p._store(f"resp_{i}", {"id": f"resp_{i}"}, "x")
    assert len(p.stored) == MAX_STORED_RESPONSES and "resp_0" not in p.stored


async def test_background_response_and_cancel(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider(Behaviour(ttft=0.05, tokens=2))
    url = p.base_url + "/responses"
    async with session.post(url, json={"model": "m", "input": "x", "background": True}) as resp:
        queued = await resp.json()
    assert queued["status"] == "queued" and queued["background"] is True
    for _ in range(100):
        async with session.get(f"{url}/{queued['id']}") as resp:
            polled = await resp.json()
        if polled["status"] == "completed":
            break
        await asyncio.sleep(0.01)
    assert (
        polled["status"] == "completed"
        and polled["output"][0]["content"][0]["text"] == "alpha#0:0 alpha#0:1 "
    )
    p.behaviour = Behaviour(ttft=5.0, tokens=2)
    async with session.post(url, json={"model": "m", "input": "x", "background": True}) as resp:
        rid = (await resp.json())["id"]
    async with session.post(f"{url}/{rid}/cancel") as resp:
        assert (await resp.json())["status"] == "cancelled"
    async with session.post(f"{url}/{queued['id']}/cancel") as resp:
        assert (await resp.json())["status"] == "completed"  # already done: nothing to cancel
    p.behaviour = Behaviour(tokens=1)
    async with session.post(url, json={"model": "m", "input": "x"}) as resp:
        plain = (await resp.json())["id"]
    async with session.post(f"{url}/{plain}/cancel") as resp:
        assert resp.status == 400  # only background responses can be cancelled
    async with session.put(f"{url}/{plain}") as resp:
        assert resp.status == 405


# -------------------------------------------------------------------------------------- completions


async def test_sdk_completions_stream_and_json(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider(Behaviour(tokens=3))
    async with sdk(p) as client:
        stream = await client.completions.create(
            model="m", prompt="def f(", stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        r = await client.completions.create(model="m", prompt="def f(")
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "alpha#0:0 alpha#0:1 alpha#0:2 " and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert r.choices[0].text == "alpha#1:0 alpha#1:1 alpha#1:2 " and r.usage is not None
    raw = bytes(p.records[0].sent)
    assert raw.endswith(b"data: [DONE]\n\n") and b'"role"' not in raw  # no role chunk in this API
    det = StreamDetector(COMPLETIONS)
    assert det.feed(raw) == 1
    assert COMPLETIONS.usage(parse_json_body(bytes(p.records[1].sent), COMPLETIONS)) == Usage(10, 3)


# --------------------------------------------------------------------------------------- embeddings


async def test_sdk_embeddings(make_provider: MakeProvider) -> None:
    p = await make_provider(Behaviour(prompt_tokens=4))
    async with sdk(p) as client:
        r = await client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])  # base64
        f = await client.embeddings.create(
            model="text-embedding-3-small", input="hello", encoding_format="float", dimensions=8
        )
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 16
    assert r.usage.prompt_tokens == 8
    expected = embedding_vector("text-embedding-3-small", "hello", 16)
    assert r.data[0].embedding == pytest.approx(expected, abs=1e-6)  # float32 round trip
    assert f.data[0].embedding == embedding_vector("text-embedding-3-small", "hello", 8)
    assert sum(x * x for x in f.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    assert all(not rec.stream and rec.api == "embeddings" for rec in p.records)


async def test_embeddings_same_vectors_on_every_provider(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    bodies = []
    for name in ("a", "b"):
        p = await make_provider(Behaviour(), name=name)
        async with session.post(
            p.base_url + "/embeddings", json={"model": "e", "input": [[1, 2, 3]]}
        ) as resp:
            bodies.append(parse_json_body(await resp.read(), EMBEDDINGS))
    assert bodies[0]["data"] == bodies[1]["data"]


@pytest.mark.parametrize("fault", ["reset", "malformed", "error"])
async def test_embeddings_faults(
    make_provider: MakeProvider, session: aiohttp.ClientSession, fault: str
) -> None:
    p = await make_provider(Behaviour(ttft=0.02, **{FAULTS[fault]: 0}))
    try:
        async with session.post(p.base_url + "/embeddings", json={"model": "e", "input": "x"}) as resp:
            status, raw = resp.status, await resp.read()
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        assert fault == "reset"
        return
    if fault == "error":
        assert status == 500
    else:
        assert status == 200 and fault == "malformed"
        with pytest.raises(Exception, match="malformed"):
            parse_json_body(raw, EMBEDDINGS)


async def test_timing_and_errors_apply_to_every_api(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    p = await make_provider(Behaviour(status=429, retry_after=2))
    for path, body in (
        ("/responses", {"input": "x"}),
        ("/embeddings", {"input": "x"}),
        ("/completions", {"prompt": "x"}),
    ):
        async with session.post(p.base_url + path, json={"model": "m", **body}) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "2"
        async with session.get(p.base_url + path) as resp:
            assert resp.status == 405
    p.behaviour = Behaviour(ttft=0.1)
    async with session.post(p.base_url + "/embeddings", json={"model": "m", "input": "x"}) as resp:
        assert resp.status == 200
    rec = p.records[-1]
    assert rec.finished_at is not None and rec.finished_at - rec.arrived_at >= 0.1 - EARLY


async def test_forwarded_responses_stream_with_cost_trailer_parses_in_the_sdk(
    make_provider: MakeProvider, session: aiohttp.ClientSession
) -> None:
    """The forwarding helpers on a real Responses stream, cut at random: the bytes come out exactly,
    plus one trailer comment after response.completed, and the SDK still parses every event."""
    p = await make_provider(Behaviour(tokens=5, prompt_tokens=1000))
    async with session.post(
        p.base_url + "/responses", json={"model": "m", "input": "x", "stream": True}
    ) as r:
        raw = await r.read()
    rnd = random.Random(5)
    for _ in range(50):
        out, pending, usage, i = b"", b"", None, 0
        while i < len(raw):
            n = rnd.randint(1, 200)
            buf, i = pending + raw[i : i + n], i + n
            cut = event_cut(buf)
            whole, pending = buf[:cut], buf[cut:]
            whole, u = take_usage(whole, RESPONSES, strip=True)
            usage = u or usage
            at = end_at(whole, RESPONSES)
            if at is not None:
                assert usage is not None
                whole = insert_cost(whole, at, f"{usage.cost_usd(1.0, 2.0):.6f}")
            out += whole
        out += pending
        assert usage == Usage(1000, 5)
        trailer = b": X-GammaInfra-Cost-USD: 0.001010\n\n"
        assert out == raw + trailer

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=out, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/responses", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        async with client:
            stream = await client.responses.create(model="m", input="x", stream=True)
            types = [e.type async for e in stream]
    finally:
        await runner.cleanup()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 5


@pytest.mark.parametrize("n", [1, 2, 3, 5, 13, 20, 57])
def test_prose_is_whole_sentences_of_the_asked_length(n: int) -> None:
    for seed in ("a/0", "a/1", "b/0"):
        words = prose_words(seed, n)
        assert len(words) == n and all(w.endswith(" ") and w.strip() for w in words)
        assert words[-1].rstrip().endswith((".", "!"))
        text = "".join(words).strip()
        while text:  # the answer is whole sentences from the set, one after another
            sentence = next((s for s in SENTENCES if text.startswith(s)), None)
            assert sentence is not None, text
            text = text[len(sentence) :].lstrip()
    assert prose_words("a/0", 20) != prose_words("a/1", 20) or prose_words("b/0", 20) != prose_words(
        "a/0", 20
    )
