"""The OpenAI Node SDK and the Vercel AI SDK's default OpenAI provider (which calls /v1/responses),
run by `node` against the simulated provider: proof that the simulator's Responses and embeddings
formats are what those clients expect. The same script runs against the proxy once it serves them.

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

from hedge.simprovider import Behaviour, SimProvider

NODE_DIR = Path(__file__).resolve().parent / "node"


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


async def run_clients(node: str, base_url: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        node, str(NODE_DIR / "sdk_clients.mjs"), base_url,
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
