"""The OpenAI Node SDK and the Vercel AI SDK's default OpenAI provider (which calls /v1/responses),
run by `node` against the simulated provider: proof that the simulator's Responses and embeddings
formats are what those clients expect; then the same script against the proxy serving the built-in
demo (`hedge serve` without a config), through `gammainfra/fast`.

Needs `node` and `npm ci --prefix tests/node` (.ci/install-node-sdks.sh does both); without them the
test skips, unless HEDGE_REQUIRE_NODE_SDKS is set (CI), where it fails instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import orjson
import pytest

from hedge.catalog import Catalog
from hedge.config import parse_config
from hedge.demo import demo_raw_config, start_demo_providers
from hedge.proxy import Proxy
from hedge.server import bound_port, build_app, start_site
from hedge.simprovider import Behaviour, SimProvider

from .test_metrics import Exposition

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


def node_or_skip() -> str:
    node = shutil.which("node")
    reason = ""
    if node is None:
        reason = "no `node` on PATH"
    elif not (NODE_DIR / "node_modules" / "openai").is_dir():
        reason = "Node SDKs not installed (npm ci --prefix tests/node)"
    if reason:
        if os.environ.get("HEDGE_REQUIRE_NODE_SDKS"):
            pytest.fail(reason + "; HEDGE_REQUIRE_NODE_SDKS is set (.ci/install-node-sdks.sh installs them)")
        pytest.skip(reason)
    assert node is not None
    return node


async def run_clients(node: str, base_url: str, *models: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        node, str(NODE_DIR / "sdk_clients.mjs"), base_url, *models,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=NODE_DIR,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    return orjson.loads(out.splitlines()[-1])


async def test_node_and_vercel_sdks_against_the_simulator() -> None:
    node = node_or_skip()
    async with SimProvider("sim", Behaviour(tokens=6, prompt_tokens=9), prose=True) as p:
        got = await run_clients(node, p.base_url)
    json_answer, stream = got["node_json"], got["node_stream"]
    assert json_answer["status"] == "completed" and json_answer["text"].rstrip().endswith((".", "!"))
    assert json_answer["usage"]["input_tokens"] == 9 and json_answer["usage"]["output_tokens"] == 6
    assert stream["types"][:2] == ["response.created", "response.in_progress"]
    assert stream["types"][-1] == "response.completed" and len(stream["text"].split()) == 6
    assert got["node_embeddings"]["count"] == 2 and got["node_embeddings"]["dims"] == 16
    assert len(got["vercel_text"]["text"].split()) == 6 and got["vercel_text"]["usage"]["inputTokens"] == 9
    assert (
        len(got["vercel_stream"]["text"].split()) == 6 and got["vercel_stream"]["usage"]["outputTokens"] == 6
    )
    assert got["vercel_embedding"]["dims"] == 16
    # the Vercel provider really used the Responses API, not chat completions
    assert {r.api for r in p.records} == {"responses", "embeddings"}
    assert sum(r.api == "responses" for r in p.records) == 4


async def test_node_and_vercel_sdks_against_the_proxy_demo() -> None:
    """The clients a new user tries first, against `hedge serve`'s demo: Responses (JSON and stream)
    and embeddings, all through the fast lane; the Vercel provider's calls are Responses calls."""
    node = node_or_skip()
    providers = await start_demo_providers()
    try:
        cfg = parse_config(demo_raw_config({p.name: p.base_url for p in providers}, port=0))
        proxy = Proxy(Catalog(cfg))
        runner = await start_site(build_app(proxy), "127.0.0.1", 0, shutdown_timeout=1.0)
        try:
            url = f"http://127.0.0.1:{bound_port(runner)}/v1"
            got = await run_clients(node, url, "gammainfra/fast", "gammainfra/fast")
            m = Exposition(proxy.metrics.render().decode())
        finally:
            await runner.cleanup()
    finally:
        for p in providers:
            await p.stop()
    json_answer, stream = got["node_json"], got["node_stream"]
    assert json_answer["status"] == "completed" and json_answer["text"].rstrip().endswith((".", "!", "?"))
    assert json_answer["usage"]["output_tokens"] == len(json_answer["text"].split())
    assert stream["types"][:2] == ["response.created", "response.in_progress"]
    assert stream["types"][-1] == "response.completed" and stream["text"].strip()
    assert got["node_embeddings"]["count"] == 2 and got["node_embeddings"]["dims"] > 0
    assert got["vercel_text"]["text"].strip() and got["vercel_text"]["usage"]["inputTokens"] > 0
    assert got["vercel_stream"]["text"].strip() and got["vercel_stream"]["usage"]["outputTokens"] > 0
    assert got["vercel_embedding"]["dims"] == got["node_embeddings"]["dims"]
    codes = {(lab["api"], lab["code"]): v for lab, v in m.series("hedge_requests_total")}
    assert codes == {("responses", "200"): 4, ("embeddings", "200"): 2}  # no chat: Vercel used Responses
