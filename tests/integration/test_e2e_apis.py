"""End-to-end: the Responses API, embeddings and legacy completions through the fast lane (issue 11).

Simulated providers and the proxy run as real servers on 127.0.0.1; the official `openai` SDK is the
client where SDK compatibility is the point, aiohttp where exact bytes are. As in test_e2e_race, the
order of events comes from gates (`Behaviour.gate`), not from wall-clock margins: a provider held at
its gate cannot end its request on its own, so a disconnect there is the proxy's doing.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from hedge.simprovider import Behaviour, SimProvider

from ..conftest import RunningProxy, eventually, raw_config, read_stream, run_proxy, same_stream, sims

SLOW = 5.0  # a loser's delay: if it were not cancelled it would run this long
EMB_PRICE = 0.02  # USD per 1M input tokens, as openai/text-embedding-3-small in the demo
COST_AFTER_END = re.compile(rb": X-GammaInfra-Cost-USD: ([0-9.]+)\n\n$")


def held(before_token: int = 0, **kw: Any) -> Behaviour:
    """A provider that stops before content chunk `before_token` until the test opens its gate."""
    return Behaviour(gate=asyncio.Event(), gate_before_token=before_token, **kw)


def config(ps: dict[str, SimProvider], **kw: Any) -> dict[str, Any]:
    """Chat models m/<name> (one per provider) and an embeddings model m/emb served by all of them, all
    in gammainfra/fast: a chat-kind request races the m/<name>, an embeddings request the m/emb."""
    models: dict[str, Any] = {
        f"m/{n}": {
            "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0,
            "serve": [{"provider": n, "model": f"up-{n}"}],
        }
        for n in ps
    }  # fmt: skip
    models["m/emb"] = {
        "input_usd_per_mtok": EMB_PRICE, "output_usd_per_mtok": 0.0, "tags": ["embeddings"],
        "serve": [{"provider": n, "model": "text-embedding-3-small"} for n in ps],
    }  # fmt: skip
    fast = {"default_delay_ms": 100, **kw.pop("fast", {})}
    raw = raw_config({n: p.base_url for n, p in ps.items()}, models=models, fast=fast, **kw)
    return raw


def sdk(px: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=px.base_url, api_key="sk-unused", max_retries=0)


def responses_body(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": "gammainfra/fast", "input": "hi", "stream": stream, **extra}


async def no_leaks(px: RunningProxy) -> None:
    assert await eventually(lambda: not px.proxy.tasks)
    assert px.proxy.inflight == 0


# ---------------------------------------------------------------------------------------- Responses


async def test_sdk_responses_create_json_through_the_fast_lane() -> None:
    async with sims(("a", Behaviour(tokens=3)), ("b", Behaviour(ttft=SLOW))) as ps:
        async with run_proxy(config(ps)) as px, sdk(px) as client:
            raw = await client.responses.with_raw_response.create(model="gammainfra/fast", input="hi")
            resp = raw.parse()
            assert raw.headers["X-GammaInfra-Endpoint"] == "m/a@a"
            assert resp.output_text == "a#0:0 a#0:1 a#0:2 "
            assert resp.usage is not None and (resp.usage.input_tokens, resp.usage.output_tokens) == (10, 3)
            cost = float(raw.headers["X-GammaInfra-Cost-USD"])
            assert cost == pytest.approx((10 * 1.0 + 3 * 2.0) / 1e6)
            assert px.proxy.affinity.lookup(resp.id) == "a"
            assert ps["a"].records[0].api == "responses"
            assert ps["b"].records == []  # a answered before the hedge delay
            await no_leaks(px)


async def test_sdk_responses_create_streaming_through_the_fast_lane() -> None:
    async with sims(("a", Behaviour(tokens=4, token_gap=0.001)), ("b", Behaviour(ttft=SLOW))) as ps:
        async with run_proxy(config(ps)) as px, sdk(px) as client:
            stream = await client.responses.create(model="gammainfra/fast", input="hi", stream=True)
            seen = [ev async for ev in stream]
            types = [e.type for e in seen]
            assert types[:2] == ["response.created", "response.in_progress"]
            assert types[-1] == "response.completed"
            text = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
            assert text == "a#0:0 a#0:1 a#0:2 a#0:3 "
            final = seen[-1].response  # type: ignore[union-attr]
            assert px.proxy.affinity.lookup(final.id) == "a"  # recorded from response.created
            # the SDK's stateful helper reads the same stream
            async with client.responses.stream(model="gammainfra/fast", input="hi") as s:
                done = await s.get_final_response()
            assert done.output_text == "a#1:0 a#1:1 a#1:2 a#1:3 "
            await no_leaks(px)


async def test_created_at_once_but_late_delta_loses_to_a_later_real_delta() -> None:
    # a sends response.created + in_progress with its headers at once, then holds before its first
    # delta (it can never produce one on its own); b is launched after the 100 ms hedge delay, has its
    # first delta 50 ms later, then holds after it: b must win, a must be cut at the commit while b's
    # stream is still going, and the client gets b's bytes exactly
    b = held(before_token=1, ttft=0.05)
    async with sims(("a", held(role_chunk_with_headers=True)), ("b", b)) as ps:
        async with run_proxy(config(ps)) as px, aiohttp.ClientSession() as http:
            async with http.post(px.url + "/v1/responses", json=responses_body()) as r:
                assert r.status == 200
                assert r.headers["X-GammaInfra-Endpoint"] == "m/b@b"
                assert r.headers["Content-Type"].startswith("text/event-stream")
                first = await r.content.readany()
                a_rec, b_rec = ps["a"].records[0], ps["b"].records[0]
                assert await eventually(lambda: a_rec.disconnected_at is not None)  # the loser is cut
                assert not b_rec.ended  # at the commit, not when the request ended
                assert a_rec.headers_sent_at is not None and b"response.created" in a_rec.sent
                assert b.gate is not None
                b.gate.set()
                body = first + await read_stream(r)
            # byte for byte b's stream, plus the cost comment after the terminal event (no [DONE] here)
            m = COST_AFTER_END.search(body)
            assert m is not None and b"[DONE]" not in body
            assert body[: m.start()] == bytes(b_rec.sent)
            assert float(m.group(1)) == pytest.approx((10 * 1.0 + 5 * 2.0) / 1e6)
            assert not a_rec.completed
            await no_leaks(px)


async def test_previous_response_id_sticks_to_its_provider_even_when_slower() -> None:
    async with sims(("a", Behaviour(tokens=2)), ("b", Behaviour(ttft=SLOW))) as ps:
        async with run_proxy(config(ps)) as px, sdk(px) as client:
            first = await client.responses.create(model="gammainfra/fast", input="hi")
            assert px.proxy.affinity.lookup(first.id) == "a"
            # now a is the slow one (well past the hedge delay) and b the fast one: an unpinned request
            # would be won by b's hedge, the continuation must still go to a alone
            ps["a"].behaviour = Behaviour(ttft=0.4, tokens=2)
            ps["b"].behaviour = Behaviour(tokens=2)
            raw = await client.responses.with_raw_response.create(
                model="gammainfra/fast", input="more", previous_response_id=first.id, stream=True
            )
            assert raw.headers["X-GammaInfra-Endpoint"] == "m/a@a"
            events = [ev async for ev in raw.parse()]
            second = events[-1].response  # type: ignore[union-attr]
            assert second.previous_response_id == first.id
            assert len(ps["a"].records) == 2 and ps["a"].records[1].body["previous_response_id"] == first.id
            assert ps["b"].records == []  # never hedged, though b would have been faster
            assert px.proxy.affinity.lookup(second.id) == "a"
            # the control: without a parent, b's hedge wins
            third = await client.responses.with_raw_response.create(model="gammainfra/fast", input="x")
            assert third.headers["X-GammaInfra-Endpoint"] == "m/b@b"
            with pytest.raises(openai.NotFoundError) as e:
                await client.responses.create(
                    model="gammainfra/fast", input="x", previous_response_id="resp_unknown"
                )
            assert e.value.code == "previous_response_not_found"
            await no_leaks(px)


async def test_owner_that_no_longer_holds_the_parent_answers_for_itself() -> None:
    # the gateway still maps the id to a, but a has dropped it: a's own 404 is the caller's answer,
    # never a failover to b (which could not hold it either)
    async with sims(("a", Behaviour(tokens=2)), ("b", Behaviour())) as ps:
        async with run_proxy(config(ps)) as px, sdk(px) as client:
            first = await client.responses.create(model="gammainfra/fast", input="hi")
            ps["a"].stored.clear()
            with pytest.raises(openai.NotFoundError) as e:
                await client.responses.create(
                    model="gammainfra/fast", input="more", previous_response_id=first.id
                )
            assert e.value.code == "previous_response_not_found"
            assert len(ps["a"].records) == 2 and ps["b"].records == []
            await no_leaks(px)


async def test_stored_response_state_reaches_its_owner_and_unknown_ids_get_404() -> None:
    async with sims(("a", Behaviour(tokens=2)), ("b", Behaviour(ttft=SLOW))) as ps:
        async with run_proxy(config(ps)) as px, sdk(px) as client:
            made = await client.responses.create(model="gammainfra/fast", input="remember me")
            got = await client.responses.retrieve(made.id)
            assert got.id == made.id and got.output_text == made.output_text
            items = await client.responses.input_items.list(made.id)
            assert [i.type for i in items.data] == ["message"]
            await client.responses.delete(made.id)
            assert made.id not in ps["a"].stored
            with pytest.raises(openai.NotFoundError):  # forgotten after the DELETE: our own 404
                await client.responses.retrieve(made.id)
            assert px.proxy.affinity.lookup(made.id) is None
        seen = [len(p.records) for p in ps.values()]
        async with run_proxy(config(ps)) as px, aiohttp.ClientSession() as http:
            for method, path in (
                ("GET", "/v1/responses/resp_nobody"),
                ("DELETE", "/v1/responses/resp_nobody"),
                ("POST", "/v1/responses/resp_nobody/cancel"),
                ("GET", "/v1/responses/resp_nobody/input_items"),
            ):
                async with http.request(method, px.url + path) as r:
                    assert r.status == 404
                    err = (await r.json())["error"]
                    assert err["code"] == "not_found" and "resp_nobody" in err["message"]
            assert [len(p.records) for p in ps.values()] == seen  # never a guess


async def test_background_goes_to_one_provider_unhedged_and_can_be_cancelled() -> None:
    # a answers the background request only after 300 ms, well past the 100 ms hedge delay
    slow_then_long = Behaviour(headers_delay=0.3, ttft=0.3, token_gap=1.0, tokens=30)
    async with sims(("a", slow_then_long), ("b", Behaviour())) as ps:
        async with run_proxy(config(ps)) as px, sdk(px) as client:
            queued = await client.responses.create(model="gammainfra/fast", input="hi", background=True)
            assert queued.status == "queued"
            assert ps["b"].records == []  # no hedge: it would have started a second billed job
            assert px.proxy.affinity.lookup(queued.id) == "a"
            cancelled = await client.responses.cancel(queued.id)
            assert cancelled.status == "cancelled"
            await no_leaks(px)


async def test_responses_bad_input_is_400_json_and_unknown_model_404() -> None:
    async with sims(("a", Behaviour())) as ps:
        async with run_proxy(config(ps)) as px, aiohttp.ClientSession() as http:
            cases = [
                ({"model": "gammainfra/fast"}, 400, "missing_required_parameter", "input"),
                ({"model": "gammainfra/fast", "input": 5}, 400, "invalid_type", "input"),
                ({"model": "gammainfra/fast", "input": ["x"]}, 400, "invalid_type", "input[0]"),
                ({"model": "gammainfra/fast", "input": "x", "stream": "yes"}, 400, "invalid_type", "stream"),
                ({"model": "made/up", "input": "x"}, 404, "model_not_found", "model"),
                ({"model": "m/emb", "input": "x"}, 400, "model_not_supported", "model"),
            ]
            for body, status, code, param in cases:
                async with http.post(px.url + "/v1/responses", json=body) as r:
                    assert r.status == status, body
                    assert r.headers["Content-Type"].startswith("application/json")
                    err = (await r.json())["error"]
                    assert (err["code"], err["param"]) == (code, param), body
            assert ps["a"].records == []


async def test_new_routes_keep_the_hostile_client_limits() -> None:
    """Body size, JSON shape and media type are checked on every racing route as on chat, before any
    upstream call (issue 13's rules, applied by the one handler)."""
    async with sims(("a", Behaviour())) as ps:
        raw = config(ps, server={"max_body_bytes": 4096, "max_json_items": 64})
        async with run_proxy(raw) as px, aiohttp.ClientSession() as http:
            for path in ("/v1/responses", "/v1/embeddings", "/v1/completions"):
                big = {"model": "gammainfra/fast", "input": "x" * 8000, "prompt": "x"}
                many = {"model": "gammainfra/fast", "input": ["x"] * 100, "prompt": ["x"] * 100}
                for body, status, code in (
                    (big, 413, "request_too_large"),
                    (many, 400, "request_too_complex"),
                ):
                    async with http.post(px.url + path, json=body) as r:
                        assert r.status == status, path
                        assert (await r.json())["error"]["code"] == code, path
                async with http.post(px.url + path, data=b"{}", headers={"Content-Type": "text/plain"}) as r:
                    assert r.status == 415, path
            assert ps["a"].records == []
            await no_leaks(px)


async def test_provider_without_the_path_is_skipped_and_its_chat_stays_healthy() -> None:
    # a is an OpenAI-compatible server without /v1/responses (a text 404 page); b has it
    no_path = Behaviour(status=404, error_body=b"404 page not found")
    async with sims(("a", no_path), ("b", Behaviour(tokens=2))) as ps:
        async with run_proxy(config(ps)) as px, sdk(px) as client:
            for _ in range(3):
                raw = await client.responses.with_raw_response.create(model="gammainfra/fast", input="x")
                assert raw.headers["X-GammaInfra-Endpoint"] == "m/b@b"
            assert len(ps["a"].records) == 1  # learned at the first 404, then skipped
            assert not px.proxy.api_support.serves(px.proxy.catalog.resolve("m/a").candidates[0], "responses")
            ps["a"].behaviour = Behaviour(tokens=1)
            chat = await client.chat.completions.with_raw_response.create(
                model="m/a", messages=[{"role": "user", "content": "x"}]
            )
            assert chat.headers["X-GammaInfra-Endpoint"] == "m/a@a"  # its breaker did not open


async def test_apis_config_keeps_a_provider_out_of_an_api() -> None:
    async with sims(("a", Behaviour()), ("b", Behaviour(ttft=0.05))) as ps:
        raw = config(ps)
        raw["providers"]["a"]["apis"] = ["chat"]
        async with run_proxy(raw) as px, sdk(px) as client:
            raw_resp = await client.responses.with_raw_response.create(model="gammainfra/fast", input="x")
            assert raw_resp.headers["X-GammaInfra-Endpoint"] == "m/b@b"
            assert ps["a"].records == []


# --------------------------------------------------------------------------------------- embeddings


async def test_sdk_embeddings_create_through_the_fast_lane() -> None:
    async with sims(("a", Behaviour(prompt_tokens=7)), ("b", Behaviour(ttft=SLOW))) as ps:
        async with run_proxy(config(ps)) as px, sdk(px) as client:
            raw = await client.embeddings.with_raw_response.create(
                model="gammainfra/fast", input=["one", "two"]
            )
            emb = raw.parse()
            assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) > 0
            assert raw.headers["X-GammaInfra-Endpoint"] == "m/emb@a"
            assert emb.usage.prompt_tokens == 14
            assert float(raw.headers["X-GammaInfra-Cost-USD"]) == pytest.approx(14 * EMB_PRICE / 1e6)
            assert ps["a"].records[0].api == "embeddings"
            assert ps["a"].records[0].body["model"] == "text-embedding-3-small"
            await no_leaks(px)


async def test_embeddings_first_complete_valid_body_wins_and_losers_are_cut() -> None:
    # a answers at once with a truncated body: it must lose, not win; b is launched on that failure,
    # c only after the hedge delay and then takes SLOW: b wins, c is disconnected
    trunc = Behaviour(malformed_after_tokens=0)
    async with sims(("a", trunc), ("b", Behaviour(ttft=0.02)), ("c", Behaviour(ttft=SLOW))) as ps:
        async with run_proxy(config(ps, fast={"default_delay_ms": 10})) as px, sdk(px) as client:
            raw = await client.embeddings.with_raw_response.create(model="gammainfra/fast", input="x")
            assert raw.headers["X-GammaInfra-Endpoint"] == "m/emb@b"
            assert len(raw.parse().data) == 1
            assert bytes(ps["b"].records[0].sent) == raw.content  # the winner's bytes, exactly
            if ps["c"].records:  # launched by the hedge timer before b answered: cut, never completed
                rec = ps["c"].records[0]
                assert await eventually(lambda: rec.disconnected_at is not None)
                assert not rec.completed
            await no_leaks(px)


async def test_embeddings_loser_is_disconnected() -> None:
    async with sims(("a", Behaviour(ttft=SLOW)), ("b", Behaviour(ttft=0.0))) as ps:
        async with run_proxy(config(ps, fast={"default_delay_ms": 50})) as px, sdk(px) as client:
            raw = await client.embeddings.with_raw_response.create(model="gammainfra/fast", input="x")
            assert raw.headers["X-GammaInfra-Endpoint"] == "m/emb@b"
            rec = ps["a"].records[0]
            assert await eventually(lambda: rec.disconnected_at is not None)
            assert not rec.completed
            await no_leaks(px)


async def test_embeddings_and_chat_refuse_each_others_models() -> None:
    async with sims(("a", Behaviour())) as ps:
        raw = config(ps)
        async with run_proxy(raw) as px, aiohttp.ClientSession() as http:
            cases = [
                ("/v1/chat/completions", {"model": "m/emb", "messages": [{"role": "user", "content": "x"}]},
                 400, "model_not_supported", "model"),
                ("/v1/embeddings", {"model": "m/a", "input": "x"}, 400, "model_not_supported", "model"),
                ("/v1/embeddings", {"model": "m/emb"}, 400, "missing_required_parameter", "input"),
                ("/v1/embeddings", {"model": "m/emb", "input": 3}, 400, "invalid_type", "input"),
                ("/v1/embeddings", {"model": "m/emb", "input": ["x"] * 2049}, 400, "array_above_max_length",
                 "input"),
                ("/v1/embeddings", {"model": "made/up", "input": "x"}, 404, "model_not_found", "model"),
            ]  # fmt: skip
            for path, body, status, code, param in cases:
                async with http.post(px.url + path, json=body) as r:
                    assert r.status == status, (path, body)
                    err = (await r.json())["error"]
                    assert (err["code"], err["param"]) == (code, param), (path, body)
            assert ps["a"].records == []
            async with http.get(px.url + "/metrics") as r:
                text = await r.text()
            assert 'hedge_requests_total{api="embeddings",code="400",route="m/emb"}' not in text
            assert 'hedge_requests_total{api="embeddings",code="400",route="m/a"} 1.0' in text
            assert 'hedge_requests_total{api="chat",code="400",route="m/emb"} 1.0' in text


# -------------------------------------------------------------------------------- legacy completions


async def test_legacy_completions_stream_is_the_winners_bytes() -> None:
    b = held(before_token=1, ttft=0.05)
    async with sims(("a", held()), ("b", b)) as ps:
        async with run_proxy(config(ps)) as px, aiohttp.ClientSession() as http:
            body = {"model": "gammainfra/fast", "prompt": "def f(", "suffix": "):", "stream": True}
            async with http.post(px.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                assert r.headers["X-GammaInfra-Endpoint"] == "m/b@b"
                first = await r.content.readany()
                a_rec, b_rec = ps["a"].records[0], ps["b"].records[0]
                assert await eventually(lambda: a_rec.disconnected_at is not None)
                assert not b_rec.ended
                assert b.gate is not None
                b.gate.set()
                got = first + await read_stream(r)
            assert b_rec.api == "completions"
            assert b_rec.body["stream_options"] == {"include_usage": True}  # asked for, for the cost
            assert same_stream(got, bytes(b_rec.sent))  # usage event stripped again, cost before [DONE]
            texts = [
                ch["text"]
                for block in got.split(b"\n\n")
                if block.startswith(b"data: {")
                for ch in orjson.loads(block[6:])["choices"]
            ]
            assert "".join(texts) == "b#0:0 b#0:1 b#0:2 b#0:3 b#0:4 "
            await no_leaks(px)


async def test_sdk_legacy_completions_json() -> None:
    async with sims(("a", Behaviour(tokens=2))) as ps:
        async with run_proxy(config(ps)) as px, sdk(px) as client:
            raw = await client.completions.with_raw_response.create(model="gammainfra/fast", prompt="x")
            done = raw.parse()
            assert done.choices[0].text == "a#0:0 a#0:1 "
            assert float(raw.headers["X-GammaInfra-Cost-USD"]) == pytest.approx((10 + 2 * 2.0) / 1e6)
