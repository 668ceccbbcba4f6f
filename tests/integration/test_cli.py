"""`hedge serve` as a user runs it: the built-in demo answers at once; a bad config names the key."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from hedge.config import ConfigError, load_config

LISTEN = re.compile(r"listening on http://127\.0\.0\.1:(\d+)/v1")


def start_demo() -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "HEDGE_API_KEYS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hedge", "serve", "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 20
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = LISTEN.search(line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise AssertionError("hedge serve did not report its port")


async def test_demo_serves_fast_lane_and_exits_cleanly() -> None:
    proc, port = start_demo()
    try:
        body = {
            "model": "gammainfra/fast",
            "stream": True,
            "messages": [{"role": "user", "content": "Hello, GPT-5 mini!"}],
        }
        endpoints = set()
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    text = await r.text()
                    endpoints.add(r.headers["X-GammaInfra-Endpoint"])
                    assert "Server-Timing" in r.headers
                assert text.endswith("data: [DONE]\n\n")
            async with s.get(f"http://127.0.0.1:{port}/v1/models") as r:
                ids = {m["id"] for m in (await r.json())["data"]}
        assert {"openai/gpt-5-mini", "gammainfra/fast", "gammainfra/cheap", "gammainfra/auto"} <= ids
        assert endpoints  # which provider won depends on the simulated latencies
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[providers.a]\nbase_url = 'ftp://x'\n", "providers.a.base_url"),
        (
            "[providers.a]\nbase_url = 'http://x/v1'\n"
            "[models.'m/x']\nserve = [{provider = 'zz', model = 'x'}]\n",
            "serve[0].provider",
        ),
        (
            "[providers.a]\nbase_url = 'http://x/v1'\n[models.'m/x']\nserve = [{provider = 'a'}]\n"
            "[routes.'gammainfra/fast']\nstrategy = 'fastest'\n",
            "strategy",
        ),
        ("[server]\nport = 'eighty'\n", "server.port"),
        ("[providers.a]\nbase_url = 'http://x/v1'\nkey = 'oops'\n", "providers.a.key"),
        ("this is not toml", "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(f)


def test_bad_config_stops_startup_with_message(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[providers.a]\nbase_url = 'http://x/v1'\n[models.'m/x']\nserve = [{provider = 'nope'}]\n")
    r = subprocess.run(
        [sys.executable, "-m", "hedge", "serve", "--config", str(f)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "serve[0].provider: unknown provider 'nope'" in r.stderr
    assert "Traceback" not in r.stderr


def test_example_config_in_readme_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent.parent / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert block, "README has a TOML example"
    f = tmp_path / "example.toml"
    f.write_text(block.group(1))
    cfg = load_config(f)
    assert "openai/gpt-5-mini" in cfg.models and "gammainfra/fast" in cfg.routes
