"""Shared fixtures: simulated providers and the proxy, both as real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from hedge.catalog import Catalog
from hedge.config import parse_config
from hedge.proxy import Proxy
from hedge.server import bound_port, build_app, start_site
from hedge.simprovider import SimProvider


def raw_config(
    providers: dict[str, str],
    *,
    fast: dict[str, Any] | None = None,
    models: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    timeouts: dict[str, Any] | None = None,
    feedback: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config where model "m/<provider>" is served by each provider and "m/all" by all of them."""
    names = list(providers)
    ms: dict[str, Any] = models or {
        **{
            f"m/{n}": {
                "input_usd_per_mtok": 1.0,
                "output_usd_per_mtok": 2.0,
                "serve": [{"provider": n, "model": f"up-{n}"}],
            }
            for n in names
        },
        "m/all": {
            "input_usd_per_mtok": 0.25,
            "output_usd_per_mtok": 2.0,
            "context_window": 256000,
            "max_output_tokens": 128000,
            "serve": [{"provider": n, "model": f"up-{n}"} for n in names],
        },
    }
    route = {
        "strategy": "hedge",
        "candidates": [f"m/{n}" for n in names] if not models else list(ms),
        "min_delay_ms": 10,
        "max_delay_ms": 3000,
        "default_delay_ms": 100,
        "max_attempts": len(names),
        "hedge_budget": 1.0,
        "hedge_burst": 1000,
    }
    route.update(fast or {})
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, **(server or {})},
        "providers": {n: {"base_url": url} for n, url in providers.items()},
        "models": ms,
        "routes": {"gammainfra/fast": route},
    }
    if timeouts:
        raw["timeouts"] = timeouts
    if feedback:
        raw["feedback"] = feedback
    return raw


@dataclass
class RunningProxy:
    proxy: Proxy
    url: str  # http://127.0.0.1:PORT
    runner: Any

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@asynccontextmanager
async def run_proxy(
    raw: dict[str, Any], *, api_keys: tuple[str, ...] = (), **kw: Any
) -> AsyncIterator[RunningProxy]:
    cfg = parse_config(raw)
    proxy = Proxy(Catalog(cfg), api_keys=api_keys, **kw)
    runner = await start_site(build_app(proxy), "127.0.0.1", 0, shutdown_timeout=1.0)
    try:
        yield RunningProxy(proxy, f"http://127.0.0.1:{bound_port(runner)}", runner)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def sims(*specs: tuple[str, Any]) -> AsyncIterator[dict[str, SimProvider]]:
    ps = {name: SimProvider(name, beh, seed=i) for i, (name, beh) in enumerate(specs)}
    for p in ps.values():
        await p.start()
    try:
        yield ps
    finally:
        for p in ps.values():
            await p.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def chat(model: str = "gammainfra/fast", stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}], **extra}


async def read_stream(resp: aiohttp.ClientResponse) -> bytes:
    out = bytearray()
    async for chunk in resp.content.iter_any():
        out += chunk
    return bytes(out)


def same_stream(client_body: bytes, provider_sent: bytes) -> bool:
    """True when the client got the provider's bytes unchanged, apart from the two documented edits:
    the usage event the proxy asked for is stripped again, and the cost comment precedes [DONE]."""
    cost_line = re.compile(rb": X-GammaInfra-Cost-USD: [0-9.]+\n\n(?=data: \[DONE\])")
    body, n = cost_line.subn(b"", client_body)
    if n != 1:
        return False
    usage_event = re.compile(rb'data: \{[^\n]*"choices":\[\][^\n]*"usage":\{[^\n]*\n\n')
    return body == usage_event.sub(b"", provider_sent, count=1)


async def eventually(pred: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll a condition (for things that happen on other tasks); returns its final value."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if pred():
            return True
        await asyncio.sleep(0.005)
    return pred()
