"""The config reader derived from the dataclasses: defaults stated once, every bad key named by its path."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from hedge.config import (
    ConfigError,
    FeedbackConfig,
    ModelConfig,
    RouteConfig,
    ServerConfig,
    SharedConfig,
    Timeouts,
    parse_config,
)

BASE: dict[str, Any] = {
    "providers": {"a": {"base_url": "http://127.0.0.1:1/v1"}},
    "models": {"m": {"serve": [{"provider": "a"}]}},
}


def with_(**tables: Any) -> dict[str, Any]:
    return {**BASE, **tables}


def test_an_empty_table_gives_the_dataclass_defaults() -> None:
    cfg = parse_config(with_(server={}, feedback={}, shared={"redis_url": "redis://127.0.0.1:6379/0"}))
    assert cfg.server == ServerConfig()
    assert cfg.feedback == FeedbackConfig()
    assert cfg.shared == SharedConfig(redis_url="redis://127.0.0.1:6379/0")
    assert cfg.providers["a"].timeouts == Timeouts()
    route = cfg.routes["gammainfra/fast"]
    assert route == RouteConfig(name=route.name, strategy="hedge", candidates=("m",))
    model = cfg.models["m"]
    # the defaults TOML alone has (Python callers must pass them), read from the field metadata
    meta = {f.name: f.metadata.get("toml_default") for f in dataclasses.fields(ModelConfig)}
    assert (model.input_usd_per_mtok, model.context_window, model.max_output_tokens) == (
        meta["input_usd_per_mtok"],
        meta["context_window"],
        meta["max_output_tokens"],
    )
    assert model.serve[0].model == "m"  # a serve entry's model defaults to the model's own name


def test_timeouts_are_milliseconds_in_toml_and_inherit_from_the_global_table() -> None:
    cfg = parse_config(
        with_(
            timeouts={"connect_ms": 250, "total_ms": 9000},
            providers={"a": {"base_url": "http://127.0.0.1:1/v1", "timeouts": {"idle_ms": 7}}},
        )
    )
    assert cfg.providers["a"].timeouts == Timeouts(connect=0.25, first_token=60.0, idle=0.007, total=9.0)


def test_blank_host_is_the_loopback_default_never_every_address() -> None:
    assert parse_config(with_(server={"host": ""})).server.host == ServerConfig().host


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (
            {"x": 1},
            "config.x: unknown key (allowed: apis, feedback, models, providers, routes, server, shared, "
            "timeouts)",
        ),
        ({"server": {"port": "e"}}, "server.port: expected an integer, got 'e'"),
        ({"server": {"port": 70000}}, "server.port: 70000 is out of range [0, 65535]"),
        ({"server": {"max_body_bytes": 10}}, "server.max_body_bytes: 10 is out of range [1024, 2147483648]"),
        ({"server": {"access_log": 1}}, "server.access_log: expected true or false, got 1"),
        ({"server": {"upstream_client": "zz"}}, "server.upstream_client: 'zz' is not one of fast, aiohttp"),
        ({"server": {"cors_origins": [""]}}, 'server.cors_origins: expected a list of origins (or ["*"])'),
        (
            {"server": {"shutdown_grace_s": float("nan")}},
            "server.shutdown_grace_s: expected a number, got nan",
        ),
        ({"server": []}, "server: expected a table, got list"),
        ({"timeouts": {"connect_ms": 0}}, "timeouts.connect_ms: 0 is out of range [1, inf]"),
        (
            {"providers": {"a": {"base_url": "http://x", "timeouts": {"c": 0}}}},
            "providers.a.timeouts.c: unknown key (allowed: connect_ms, first_token_ms, idle_ms, total_ms)",
        ),
        (
            {"providers": {"a": {"base_url": "http://x", "name": "b"}}},
            "providers.a.name: unknown key (allowed: api_key_env, apis, base_url, timeouts)",
        ),
        ({"providers": {"a": {}}}, "providers.a.base_url: expected an http:// or https:// URL, got None"),
        ({"models": {"m": {"serve": [{"provider": "a"}], "tags": [1]}}}, 'models."m".tags: expected a list'),
        (
            {"models": {"m": {"serve": [{"provider": "a"}], "quality": 2}}},
            'models."m".quality: 2 is out of range',
        ),
        ({"models": {"m": {"serve": [{"provider": "a", "q": 1}]}}}, 'models."m".serve[0].q: unknown key'),
        (
            {"models": {"m": {"serve": [{"provider": "b"}]}}},
            "models.\"m\".serve[0].provider: unknown provider 'b' (have: a)",
        ),
        ({"routes": {"r": {"strategy": "x"}}}, "routes.\"r\".strategy: 'x' is not one of hedge, failover"),
        ({"routes": {"r": {"max_attempts": 17}}}, 'routes."r".max_attempts: 17 is out of range [1, 16]'),
        ({"routes": {"r": {"min_delay_ms": 5000}}}, 'routes."r".min_delay_ms: must not exceed max_delay_ms'),
        ({"routes": {"r": {"candidates": ["q"]}}}, "routes.\"r\".candidates: unknown model 'q'"),
        ({"feedback": {"half_life_s": 0}}, "feedback.half_life_s: 0 is out of range [0.1, inf]"),
        ({"shared": {"redis_url": "redis://x", "key_prefix": ""}}, "shared.key_prefix: must not be empty"),
        ({"shared": {"redis_url": "redis://x", "zz": 1}}, "shared.zz: unknown key"),
    ],
)
def test_a_bad_value_names_its_path(tables: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(with_(**tables))
    assert str(e.value).startswith(message), str(e.value)
