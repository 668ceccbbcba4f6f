"""The built-in demo (`hedge serve` with no config): simulated providers on loopback, so the fast lane
can be seen working with no API keys.

Three simulated providers with different latency profiles serve a small catalog. `openai/gpt-5-mini`
carries the seed's figures (0.25 / 2.00 USD per 1M tokens, 256K context, 128K max output); the other
models' prices are illustrative. `gammainfra/fast` races all three providers, so a first `curl` shows a
hedge winning whenever the stall-prone primary stalls. `gammainfra/fast` also holds
`openai/text-embedding-3-small` (tagged `embeddings`, priced per input token only), served by two
providers: `POST /v1/embeddings` with `gammainfra/fast` races those two, and `apisupport.model_apis`
keeps it out of chat, Responses and completions races (and the chat models out of embeddings races).
"""

from __future__ import annotations

from typing import Any

from .simprovider import PROFILES, SimProvider

DEMO_PROVIDERS = (("sim-alpha", "stally"), ("sim-beta", "medium"), ("sim-gamma", "slow"))


def demo_raw_config(base_urls: dict[str, str], host: str = "127.0.0.1", port: int = 8080) -> dict[str, Any]:
    """The demo's config as a parsed-TOML dict (also the reference example of every section)."""
    a, b, g = (name for name, _ in DEMO_PROVIDERS)
    return {
        "server": {"host": host, "port": port, "api_keys_env": "HEDGE_API_KEYS"},
        "timeouts": {"connect_ms": 2000, "first_token_ms": 30000, "idle_ms": 30000, "total_ms": 300000},
        "providers": {name: {"base_url": url} for name, url in base_urls.items()},
        "models": {
            "openai/gpt-5-mini": {
                "input_usd_per_mtok": 0.25, "output_usd_per_mtok": 2.00,
                "context_window": 256000, "max_output_tokens": 128000,
                "serve": [{"provider": a, "model": "gpt-5-mini"}, {"provider": b, "model": "gpt-5-mini"}],
                "tags": ["chat", "reasoning", "tools"], "quality": 0.7,
                "description": "OpenAI's small workhorse; cheap enough to head the chat fallback chain.",
            },
            "openai/gpt-5": {
                "input_usd_per_mtok": 1.25, "output_usd_per_mtok": 10.00,
                "context_window": 400000, "max_output_tokens": 128000,
                "serve": [{"provider": g, "model": "gpt-5"}],
                "tags": ["code", "reasoning", "long-context", "tools"], "quality": 0.95,
            },
            "anthropic/claude-haiku-4.5": {
                "input_usd_per_mtok": 1.00, "output_usd_per_mtok": 5.00,
                "context_window": 200000, "max_output_tokens": 64000,
                "serve": [{"provider": b, "model": "claude-haiku-4-5"}],
                "tags": ["chat", "code", "tools"], "quality": 0.8,
            },
            "google/gemini-2.5-flash": {
                "input_usd_per_mtok": 0.30, "output_usd_per_mtok": 2.50,
                "context_window": 1048576, "max_output_tokens": 65536,
                "serve": [{"provider": g, "model": "gemini-2.5-flash"}],
                "tags": ["long-context", "chat"], "quality": 0.7,
            },
            "openai/text-embedding-3-small": {
                "input_usd_per_mtok": 0.02, "output_usd_per_mtok": 0.0,
                "context_window": 8192, "max_output_tokens": 1,
                "serve": [
                    {"provider": a, "model": "text-embedding-3-small"},
                    {"provider": b, "model": "text-embedding-3-small"},
                ],
                "tags": ["embeddings"], "quality": 0.6,
                "description": "Embeddings (POST /v1/embeddings only); two providers, so requests race.",
            },
            "openai/text-embedding-3-large": {
                "input_usd_per_mtok": 0.13, "output_usd_per_mtok": 0.0,
                "context_window": 8192, "max_output_tokens": 1,
                "serve": [{"provider": g, "model": "text-embedding-3-large"}],
                "tags": ["embeddings"], "quality": 0.8,
            },
            "meta-llama/llama-3.1-8b-instruct": {
                "input_usd_per_mtok": 0.02, "output_usd_per_mtok": 0.05,
                "context_window": 131072, "max_output_tokens": 16384,
                "serve": [{"provider": a, "model": "llama-3.1-8b-instruct"}],
                "tags": ["chat"], "quality": 0.4,
            },
        },
        "routes": {
            "gammainfra/fast": {
                "strategy": "hedge",
                "candidates": [
                    "openai/gpt-5-mini", "google/gemini-2.5-flash", "openai/text-embedding-3-small",
                ],
                "quantile": 0.95, "min_delay_ms": 25, "max_delay_ms": 3000, "default_delay_ms": 150,
                "max_attempts": 3, "hedge_budget": 0.10,
            },
            "gammainfra/cheap": {"strategy": "cheapest", "candidates": list(_MODELS)},
            "gammainfra/auto": {"strategy": "auto", "candidates": list(_MODELS)},
        },
    }  # fmt: skip


_MODELS = (
    "openai/gpt-5-mini",
    "openai/gpt-5",
    "anthropic/claude-haiku-4.5",
    "google/gemini-2.5-flash",
    "meta-llama/llama-3.1-8b-instruct",
)


async def start_demo_providers(seed: int = 7) -> list[SimProvider]:
    """Start the demo's simulated providers on ephemeral loopback ports."""
    providers = [
        SimProvider(name, PROFILES[profile], seed=seed + i, keep_records=False, prose=True)
        for i, (name, profile) in enumerate(DEMO_PROVIDERS)
    ]
    for p in providers:
        await p.start()
    return providers
