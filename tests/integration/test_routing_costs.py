"""Routing modes, cost headers, gateway keys and secret hygiene (issue 5), against real servers."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import orjson
import pytest

from hedge.auth import key_id
from hedge.catalog import Catalog
from hedge.config import parse_config
from hedge.demo import demo_raw_config
from hedge.request import parse_chat_request
from hedge.simprovider import Behaviour

from ..conftest import chat, read_stream, run_proxy, sims

URL = "/v1/chat/completions"


def catalog_raw(urls: dict[str, str]) -> dict[str, Any]:
    """Three models with distinct prices, tags and quality on three providers."""
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "providers": {n: {"base_url": u} for n, u in urls.items()},
        "feedback": {"failure_threshold": 2, "base_backoff_s": 30},
        "models": {
            "x/premium": {
                "input_usd_per_mtok": 3.0, "output_usd_per_mtok": 15.0, "quality": 0.95,
                "context_window": 200000, "max_output_tokens": 64000,
                "tags": ["code", "reasoning", "long-context", "tools"],
                "serve": [{"provider": "p1", "model": "premium-1"}],
            },
            "x/mid": {
                "input_usd_per_mtok": 0.5, "output_usd_per_mtok": 2.0, "quality": 0.7,
                "context_window": 128000, "max_output_tokens": 16000,
                "tags": ["chat", "code", "tools"],
                "serve": [{"provider": "p2", "model": "mid-1"}],
            },
            "x/budget": {
                "input_usd_per_mtok": 0.05, "output_usd_per_mtok": 0.1, "quality": 0.3,
                "context_window": 32000, "max_output_tokens": 4000,
                "tags": ["chat"],
                "serve": [{"provider": "p3", "model": "budget-1"}],
            },
        },
    }  # fmt: skip


@pytest.fixture
async def three(http: aiohttp.ClientSession):
    async with sims(
        ("p1", Behaviour(ttft=0.01)), ("p2", Behaviour(ttft=0.01)), ("p3", Behaviour(ttft=0.01))
    ) as ps:
        async with run_proxy(catalog_raw({n: p.base_url for n, p in ps.items()})) as px:
            yield px, ps


async def endpoint_for(http: aiohttp.ClientSession, px, body: dict, headers: dict | None = None) -> str:
    async with http.post(px.url + URL, json=body, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers["X-GammaInfra-Endpoint"]


async def test_cheap_picks_cheapest_healthy(http: aiohttp.ClientSession, three) -> None:
    px, ps = three
    assert await endpoint_for(http, px, chat("gammainfra/cheap", stream=False)) == "x/budget@p3"
    ps["p3"].behaviour = Behaviour(status=503)
    # fails over to the next cheapest on the error, then its breaker opens (threshold 2) ...
    for _ in range(2):
        assert await endpoint_for(http, px, chat("gammainfra/cheap", stream=False)) == "x/mid@p2"
    n = len(ps["p3"].records)
    # ... and the unhealthy cheapest one is not even tried any more
    assert await endpoint_for(http, px, chat("gammainfra/cheap", stream=False)) == "x/mid@p2"
    assert len(ps["p3"].records) == n


async def test_pinned_fails_over_in_health_order(http: aiohttp.ClientSession) -> None:
    async with sims(("a", Behaviour(status=500)), ("b", Behaviour(ttft=0.01))) as ps:
        raw = catalog_raw({"p1": ps["a"].base_url, "p2": ps["b"].base_url, "p3": ps["b"].base_url})
        raw["models"]["x/mid"]["serve"] = [{"provider": "p1", "model": "m"}, {"provider": "p2", "model": "m"}]
        async with run_proxy(raw) as px:
            assert await endpoint_for(http, px, chat("x/mid")) == "x/mid@p2"


@pytest.mark.parametrize(
    ("content", "extra", "dial", "expected_class", "expected_first"),
    [
        ("hello there, how are you?", {}, None, "chat", "x/budget@p3"),  # 14x cheaper wins at 0.5
        ("hello there", {}, "1", "chat", "x/mid@p2"),  # quality end of the dial: best of the chat chain
        ("```python\ndef f(x):\n    return x\n```\nwhy does this fail?", {}, "0.9", "code", "x/premium@p1"),
        ("fix this bug: def f(): import os", {}, "0.1", "code", "x/mid@p2"),
        (
            "prove that the square root of 2 is irrational, step by step",
            {},
            None,
            "reasoning",
            "x/premium@p1",
        ),
        (
            "what's the weather",
            {"tools": [{"type": "function", "function": {"name": "w"}}]},
            "0.2",
            "tools",
            "x/mid@p2",
        ),
        ("word " * 80_000, {}, None, "long-context", "x/premium@p1"),
    ],
)
async def test_auto_classes_pick_their_chain(
    http: aiohttp.ClientSession, three, content, extra, dial, expected_class, expected_first
) -> None:
    from hedge.autoroute import classify

    body = {"model": "gammainfra/auto", "messages": [{"role": "user", "content": content}], **extra}
    assert classify(parse_chat_request(orjson.dumps(body))) == expected_class
    px, _ = three
    headers = {"X-GammaInfra-Cost-Quality": dial} if dial is not None else {}
    async with http.post(px.url + URL, json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["X-GammaInfra-Endpoint"] == expected_first
        assert r.headers["X-GammaInfra-Task"] == expected_class


async def test_non_streaming_cost_header_exact(http: aiohttp.ClientSession, three) -> None:
    px, ps = three
    ps["p1"].behaviour = Behaviour(ttft=0.0, tokens=7, prompt_tokens=1234)
    async with http.post(px.url + URL, json=chat("x/premium", stream=False)) as r:
        body = await r.json()
        cost = r.headers["X-GammaInfra-Cost-USD"]
    assert body["usage"] == {"prompt_tokens": 1234, "completion_tokens": 7, "total_tokens": 1241}
    # (1234 * 3.0 + 7 * 15.0) / 1e6 = 0.003807
    assert cost == "0.0038070000"


async def test_stream_cost_line_and_usage_stripping(http: aiohttp.ClientSession, three) -> None:
    px, ps = three
    ps["p2"].behaviour = Behaviour(ttft=0.0, tokens=4, prompt_tokens=100)
    expected = f"{(100 * 0.5 + 4 * 2.0) / 1e6:.10f}".encode()
    for wants_usage in (False, True):
        extra = {"stream_options": {"include_usage": True}} if wants_usage else {}
        async with http.post(px.url + URL, json=chat("x/mid", **extra)) as r:
            assert r.headers["X-GammaInfra-Cost-USD"] == "pending"
            body = await read_stream(r)
        events = [e for e in body.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        assert events[-2] == b": X-GammaInfra-Cost-USD: " + expected
        has_usage_event = any(b'"usage":{' in e for e in events)
        assert has_usage_event is wants_usage
        sent = ps["p2"].records[-1].body
        assert sent["stream_options"]["include_usage"] is True  # the proxy always asks upstream
        assert sent["model"] == "mid-1"


async def test_cost_and_token_metrics(http: aiohttp.ClientSession, three) -> None:
    px, ps = three
    ps["p3"].behaviour = Behaviour(ttft=0.0, tokens=3, prompt_tokens=50)
    for stream in (False, True):
        async with http.post(px.url + URL, json=chat("x/budget", stream=stream)) as r:
            await r.read()
    async with http.get(px.url + "/metrics") as r:
        text = await r.text()
    assert 'hedge_tokens_total{kind="prompt",model="x/budget",provider="p3"} 100.0' in text
    assert 'hedge_tokens_total{kind="completion",model="x/budget",provider="p3"} 6.0' in text
    cost = 2 * (50 * 0.05 + 3 * 0.1) / 1e6
    line = next(x for x in text.splitlines() if x.startswith('hedge_cost_usd_total{model="x/budget"'))
    assert float(line.split()[-1]) == pytest.approx(cost, rel=1e-9)


async def test_wasted_cost_on_cancelled_hedges(http: aiohttp.ClientSession) -> None:
    async with sims(("a", Behaviour(ttft=5.0)), ("b", Behaviour(ttft=0.01))) as ps:
        from ..conftest import raw_config

        raw = raw_config({n: p.base_url for n, p in ps.items()}, fast={"default_delay_ms": 30})
        async with run_proxy(raw) as px:
            body = chat(messages=[{"role": "user", "content": "x" * 400}])
            async with http.post(px.url + URL, json=body) as r:
                await r.read()
            async with http.get(px.url + "/metrics") as r:
                text = await r.text()
    # the cancelled attempt on a is billed for its prompt: 400 chars / 4 + 4 per message = 104 tokens
    assert 'hedge_wasted_tokens_total{model="m/a",provider="a",reason="lost"} 104.0' in text
    line = next(x for x in text.splitlines() if x.startswith('hedge_wasted_cost_usd_total{model="m/a"'))
    assert float(line.split()[-1]) == pytest.approx(104 * 1.0 / 1e6)


async def test_limits_are_checked_before_any_upstream_call(http: aiohttp.ClientSession, three) -> None:
    px, ps = three
    cases = [
        (chat("x/mid", max_tokens=16001), "max_tokens", "invalid_value"),
        (chat("x/mid", max_completion_tokens=10**6), "max_completion_tokens", "invalid_value"),
        (
            chat("x/budget", messages=[{"role": "user", "content": "w" * 200_000}]),
            "messages",
            "context_length_exceeded",
        ),
    ]
    for body, param, code in cases:
        async with http.post(px.url + URL, json=body) as r:
            assert r.status == 400
            e = (await r.json())["error"]
        assert e["param"] == param and e["code"] == code
    assert all(not p.records for p in ps.values())
    # a route keeps only the candidates that fit: 20k output tokens fits premium only
    assert await endpoint_for(http, px, chat("gammainfra/cheap", max_tokens=20000)) == "x/premium@p1"


async def test_gateway_keys(http: aiohttp.ClientSession) -> None:
    async with sims(("a", Behaviour())) as ps:
        from ..conftest import raw_config

        raw = raw_config({"a": ps["a"].base_url})
        keys = ("sk-gammainfra-alpha", "sk-gammainfra-beta")
        async with run_proxy(raw, api_keys=keys) as px:
            for headers, code in (
                ({}, "missing_api_key"),
                ({"Authorization": "Bearer sk-gammainfra-wrong"}, "invalid_api_key"),
                ({"Authorization": "Basic sk-gammainfra-alpha"}, "invalid_api_key"),
                ({"Authorization": "Bearer sk-gammainfra-alph"}, "invalid_api_key"),
            ):
                async with http.post(px.url + URL, json=chat(), headers=headers) as r:
                    assert r.status == 401
                    e = (await r.json())["error"]
                    assert e["code"] == code and e["type"] == "authentication_error"
                async with http.get(px.url + "/v1/models", headers=headers) as r:
                    assert r.status == 401
            assert ps["a"].records == []
            for k in keys:
                async with http.post(
                    px.url + URL, json=chat(stream=False), headers={"Authorization": f"Bearer {k}"}
                ) as r:
                    assert r.status == 200
            async with http.get(px.url + "/metrics") as r:
                text = await r.text()
            for k in keys:
                assert f'hedge_key_requests_total{{key_id="{key_id(k)}"}} 1.0' in text
                assert k not in text


async def test_provider_key_never_leaks(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-provider-SECRET-0123456789abcdef"
    monkeypatch.setenv("HEDGE_TEST_PROVIDER_KEY", secret)
    caplog.set_level(logging.DEBUG)
    echo = orjson.dumps(
        {"error": {"message": f"Incorrect API key provided: {secret}", "type": "x", "code": "k"}}
    )
    async with sims(
        ("a", Behaviour(status=400, error_body=echo)), ("b", Behaviour(status=401, error_body=echo))
    ) as ps:
        from ..conftest import raw_config

        raw = raw_config({n: p.base_url for n, p in ps.items()})
        for n in raw["providers"]:
            raw["providers"][n]["api_key_env"] = "HEDGE_TEST_PROVIDER_KEY"
        async with run_proxy(raw) as px:
            bodies: list[bytes] = []
            headers: list[str] = []
            for model in ("m/a", "m/b", "gammainfra/fast", "nope"):
                for stream in (False, True):
                    async with http.post(px.url + URL, json=chat(model, stream=stream)) as r:
                        bodies.append(await r.read())
                        headers.append(str(dict(r.headers)))
            async with http.post(px.url + URL, data=b"{bad json") as r:
                bodies.append(await r.read())
            async with http.get(px.url + "/metrics") as r:
                bodies.append(await r.read())
            async with http.get(px.url + "/v1/models") as r:
                bodies.append(await r.read())
    assert b"[redacted]" in bodies[0]  # the provider's echo reached the client, scrubbed
    everything = b"".join(bodies).decode() + "".join(headers) + caplog.text
    assert secret not in everything
    assert secret[:16] not in everything


def test_demo_catalog_has_the_seed_figures() -> None:
    cfg = parse_config(
        demo_raw_config({"sim-alpha": "http://x/v1", "sim-beta": "http://y/v1", "sim-gamma": "http://z/v1"})
    )
    m = cfg.models["openai/gpt-5-mini"]
    assert (m.input_usd_per_mtok, m.output_usd_per_mtok) == (0.25, 2.00)
    assert (m.context_window, m.max_output_tokens) == (256000, 128000)
    cat = Catalog(cfg)
    for route in ("gammainfra/fast", "gammainfra/cheap", "gammainfra/auto"):
        assert len(cat.resolve(route).candidates) >= 2


async def test_requests_refused_before_routing_are_counted(http: aiohttp.ClientSession) -> None:
    async with sims(("a", Behaviour())) as ps:
        from ..conftest import raw_config

        async with run_proxy(raw_config({"a": ps["a"].base_url}), api_keys=("sk-gammainfra-k",)) as px:
            auth = {"Authorization": "Bearer sk-gammainfra-k"}
            cases = [
                ({}, chat(), 401),  # no key
                (auth, {"model": "made/up", "messages": [{"role": "user", "content": "x"}]}, 404),
                (auth, {"model": "m/a"}, 400),  # no messages
                ({**auth, "X-GammaInfra-Cost-Quality": "2"}, chat("m/a"), 400),  # routed, then refused
                (auth, chat("m/a", stream=False), 200),
            ]
            for headers, body, status in cases:
                async with http.post(px.url + URL, json=body, headers=headers) as r:
                    assert r.status == status
            async with http.get(px.url + "/metrics") as r:
                text = await r.text()
    assert 'hedge_requests_total{api="chat",code="401",route="-"} 1.0' in text
    assert 'hedge_requests_total{api="chat",code="404",route="-"} 1.0' in text
    assert 'hedge_requests_total{api="chat",code="400",route="-"} 1.0' in text
    assert 'hedge_requests_total{api="chat",code="400",route="m/a"} 1.0' in text
    assert 'hedge_requests_total{api="chat",code="200",route="m/a"} 1.0' in text
    assert "made/up" not in text  # a caller's made-up model name never becomes a label
