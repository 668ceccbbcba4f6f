"""The official `openai` SDK as the client, pointed at the proxy with base_url (issue 2 and 5).

Streams and non-streams through `gammainfra/fast` and a pinned model parse unchanged (the cost comment
line must not disturb the SDK's SSE parser), and errors arrive as the right `openai` exception classes.
"""

from __future__ import annotations

import openai
import pytest

from hedge.simprovider import Behaviour

from ..conftest import raw_config, run_proxy, sims


@pytest.fixture
async def stack():
    async with sims(("a", Behaviour(ttft=0.3, tokens=6)), ("b", Behaviour(ttft=0.02, tokens=6))) as ps:
        raw = raw_config({n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 50})
        async with run_proxy(raw, api_keys=("sk-gammainfra-test",)) as px:
            client = openai.AsyncOpenAI(base_url=px.base_url, api_key="sk-gammainfra-test", max_retries=0)
            yield px, ps, client
            await client.close()


async def test_sdk_streams_through_fast(stack) -> None:
    px, ps, client = stack
    stream = await client.chat.completions.create(
        model="gammainfra/fast", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text, finish, usage_seen = "", None, False
    async for chunk in stream:
        if chunk.usage is not None:
            usage_seen = True
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert "b#0:" in text  # beta won: alpha is 300 ms slow, the hedge fires at 50 ms
    assert finish == "stop"
    assert not usage_seen  # the usage chunk the proxy asked for is stripped again


async def test_sdk_stream_with_usage_and_raw_headers(stack) -> None:
    px, ps, client = stack
    raw = await client.chat.completions.with_raw_response.create(
        model="m/b",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-gammainfra-endpoint"] == "m/b@b"
    usage = None
    async for chunk in raw.parse():
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 6 and usage.prompt_tokens == 10


async def test_sdk_non_streaming_fast_and_pinned(stack) -> None:
    px, ps, client = stack
    for model, endpoint in (("gammainfra/fast", "m/b@b"), ("m/a", "m/a@a")):
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}]
        )
        resp = raw.parse()
        assert raw.headers["x-gammainfra-endpoint"] == endpoint
        assert resp.choices[0].message.content
        assert resp.usage is not None and resp.usage.total_tokens == 16
        # 10 prompt tokens at 1 USD/M + 6 completion tokens at 2 USD/M
        assert float(raw.headers["x-gammainfra-cost-usd"]) == pytest.approx(22e-6, abs=1e-12)


async def test_sdk_error_classes(stack) -> None:
    px, ps, client = stack
    with pytest.raises(openai.NotFoundError) as nf:
        await client.chat.completions.create(model="nope/nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="gammainfra/fast", messages=[])
    bad = openai.AsyncOpenAI(base_url=px.base_url, api_key="sk-gammainfra-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model="m/a", messages=[{"role": "user", "content": "x"}])
    await bad.close()
    for p in ps.values():
        p.behaviour = Behaviour(status=429)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="gammainfra/fast", messages=[{"role": "user", "content": "x"}]
        )
    for p in ps.values():
        p.behaviour = Behaviour(status=503)
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(
            model="gammainfra/fast", messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.status_code == 502


async def test_sdk_sees_mid_stream_failure_as_error(stack) -> None:
    px, ps, client = stack
    ps["b"].behaviour = Behaviour(ttft=0.01, tokens=10, reset_after_tokens=2)
    stream = await client.chat.completions.create(
        model="m/b", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
