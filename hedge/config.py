"""Configuration: the TOML contract of DESIGN §4, loaded into frozen dataclasses.

Validation happens once at start-up and every problem names the exact key, so a typo in a config never
turns into a 500 at request time. Everything has a default except what only the operator can know
(provider URLs, model prices).
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRATEGIES = ("hedge", "failover", "cheapest", "auto")
VIRTUAL_PREFIX = "gammainfra/"
# the OpenAI APIs the gateway serves (dialect names; hedge/dialects.py, hedge/apisupport.py)
API_NAMES = ("chat", "responses", "completions", "embeddings")


class ConfigError(ValueError):
    """A config problem; the message starts with the dotted key that is wrong."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds. Defaults suit LLM APIs: connecting is fast, thinking is not."""

    connect: float = 5.0
    first_token: float = 60.0
    idle: float = 60.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys_env: str | None = "HEDGE_API_KEYS"
    max_body_bytes: int = 32 * 1024 * 1024
    max_concurrency: int = 2000
    shutdown_grace_s: float = 30.0
    access_log: bool = False
    upstream_client: str = "fast"  # fast (raw asyncio protocol) | aiohttp
    # what a caller can hold (issue 13; hedge/conn_limits.py, hedge/body.py)
    header_timeout_s: float = 10.0  # first byte of a request head -> its end
    body_timeout_s: float = 60.0  # head parsed -> the whole body read
    keepalive_timeout_s: float = 15.0  # idle connection between requests (and before the first)
    max_connections: int = 10000  # per process; clamped to half the fd limit at start-up
    max_messages: int = 4096  # entries of `messages`
    max_json_items: int = 200_000  # upper bound on JSON values, checked before the body is parsed
    shutdown_write_timeout_s: float = 2.0  # a stream's last words at shutdown; then the socket is aborted
    cors_origins: tuple[str, ...] = ()  # empty = no CORS; "*" = any origin


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    base_url: str
    api_key_env: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    # the OpenAI APIs this provider serves (`apis = [...]`; default all): candidates at a provider
    # without an API are never raced for it (hedge/apisupport.py)
    apis: tuple[str, ...] = API_NAMES

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def api_key(self) -> str | None:
        """Read at call time so a rotated key in the environment is picked up; never logged."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass(frozen=True, slots=True)
class Serve:
    provider: str
    model: str


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    context_window: int
    max_output_tokens: int
    serve: tuple[Serve, ...]
    tags: tuple[str, ...] = ()
    quality: float = 0.5
    description: str = ""


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    strategy: str
    candidates: tuple[str, ...]
    quantile: float = 0.95
    min_delay_ms: float = 25.0
    max_delay_ms: float = 3000.0
    default_delay_ms: float = 500.0
    max_attempts: int = 3
    hedge_budget: float = 0.10
    hedge_burst: float = 5.0


@dataclass(frozen=True, slots=True)
class FeedbackConfig:
    """How fast statistics forget and how eagerly breakers open."""

    half_life_s: float = 10.0
    order_half_life_samples: float = 2.0
    min_samples: float = 3.0
    failure_threshold: int = 5
    base_backoff_s: float = 1.0
    max_backoff_s: float = 60.0


@dataclass(frozen=True, slots=True)
class SharedConfig:
    """[shared]: instances pool their statistics and breaker openings through Redis (hedge/shared.py).

    The password never sits in the config (or the URL): it is read from the environment variable named
    by ``password_env`` when the client connects.
    """

    redis_url: str
    password_env: str | None = None
    sync_interval_ms: float = 250.0
    key_prefix: str = "hedge:"
    forget_after_s: float = 30.0  # a stopped instance's contribution expires (Redis key TTL) after this
    timeout_ms: float = 1000.0  # one sync round trip; a slower Redis counts as down for that round

    def password(self) -> str | None:
        """Read at connect time; never logged."""
        return os.environ.get(self.password_env) if self.password_env else None


@dataclass(frozen=True, slots=True)
class ApisConfig:
    """[apis]: where response ids live and how long a provider's 404/405 for a path is believed.

    `affinity_max_entries` / `affinity_max_age_s` bound the response id -> provider map
    (hedge/affinity.py); `lacking_ttl_s` is how long a (provider, API) pair that answered 404/405 for
    the path is skipped before it is tried again (hedge/apisupport.py)."""

    affinity_max_entries: int = 100_000
    affinity_max_age_s: float = 30 * 86400.0
    lacking_ttl_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    routes: dict[str, RouteConfig]
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    shared: SharedConfig | None = None
    apis: ApisConfig = field(default_factory=ApisConfig)


# --------------------------------------------------------------------------------------------- helpers


def _table(d: Any, key: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{key}: expected a table, got {type(d).__name__}")
    return d


def _num(
    d: dict[str, Any], key: str, path: str, default: float, *, lo: float = 0.0, hi: float = math.inf
) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        raise ConfigError(f"{path}.{key}: expected a number, got {v!r}")
    if not lo <= v <= hi:
        raise ConfigError(f"{path}.{key}: {v!r} is out of range [{lo}, {hi}]")
    return float(v)


def _int(d: dict[str, Any], key: str, path: str, default: int, *, lo: int = 0, hi: int = 2**31) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{path}.{key}: expected an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ConfigError(f"{path}.{key}: {v!r} is out of range [{lo}, {hi}]")
    return v


def _str(d: dict[str, Any], key: str, path: str, default: str | None = None) -> str | None:
    v = d.get(key, default)
    if v is not None and not isinstance(v, str):
        raise ConfigError(f"{path}.{key}: expected a string, got {v!r}")
    return v


def _unknown(d: dict[str, Any], allowed: set[str], path: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise ConfigError(f"{path}.{extra[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _timeouts(d: dict[str, Any], path: str, base: Timeouts) -> Timeouts:
    _unknown(d, {"connect_ms", "first_token_ms", "idle_ms", "total_ms"}, path)
    return Timeouts(
        connect=_num(d, "connect_ms", path, base.connect * 1000, lo=1) / 1000,
        first_token=_num(d, "first_token_ms", path, base.first_token * 1000, lo=1) / 1000,
        idle=_num(d, "idle_ms", path, base.idle * 1000, lo=1) / 1000,
        total=_num(d, "total_ms", path, base.total * 1000, lo=1) / 1000,
    )


# ---------------------------------------------------------------------------------------------- loader


def parse_config(raw: dict[str, Any]) -> Config:
    """Turn a parsed TOML document into a validated Config (raises ConfigError naming the key)."""
    _unknown(
        raw, {"server", "timeouts", "providers", "models", "routes", "feedback", "shared", "apis"}, "config"
    )
    s = _table(raw.get("server", {}), "server")
    _unknown(
        s,
        {
            "host",
            "port",
            "api_keys_env",
            "max_body_bytes",
            "max_concurrency",
            "shutdown_grace_s",
            "access_log",
            "upstream_client",
            "header_timeout_s",
            "body_timeout_s",
            "keepalive_timeout_s",
            "max_connections",
            "max_messages",
            "max_json_items",
            "shutdown_write_timeout_s",
            "cors_origins",
        },
        "server",
    )
    cors = s.get("cors_origins", [])
    if not isinstance(cors, list) or not all(isinstance(o, str) and o for o in cors):
        raise ConfigError(f'server.cors_origins: expected a list of origins (or ["*"]), got {cors!r}')
    access_log = s.get("access_log", False)
    if not isinstance(access_log, bool):
        raise ConfigError(f"server.access_log: expected true or false, got {access_log!r}")
    client = _str(s, "upstream_client", "server", "fast")
    if client not in ("fast", "aiohttp"):
        raise ConfigError(f"server.upstream_client: {client!r} is not one of fast, aiohttp")
    server = ServerConfig(
        host=_str(s, "host", "server", "127.0.0.1") or "127.0.0.1",
        port=_int(s, "port", "server", 8080, hi=65535),
        api_keys_env=_str(s, "api_keys_env", "server", "HEDGE_API_KEYS"),
        max_body_bytes=_int(s, "max_body_bytes", "server", 32 * 1024 * 1024, lo=1024),
        max_concurrency=_int(s, "max_concurrency", "server", 2000, lo=1),
        shutdown_grace_s=_num(s, "shutdown_grace_s", "server", 30.0),
        access_log=access_log,
        upstream_client=client or "fast",
        header_timeout_s=_num(s, "header_timeout_s", "server", 10.0, lo=0.01),
        body_timeout_s=_num(s, "body_timeout_s", "server", 60.0, lo=0.01),
        keepalive_timeout_s=_num(s, "keepalive_timeout_s", "server", 15.0, lo=0.01),
        max_connections=_int(s, "max_connections", "server", 10000, lo=1),
        max_messages=_int(s, "max_messages", "server", 4096, lo=1),
        max_json_items=_int(s, "max_json_items", "server", 200_000, lo=16),
        shutdown_write_timeout_s=_num(s, "shutdown_write_timeout_s", "server", 2.0, lo=0.01),
        cors_origins=tuple(o.rstrip("/") for o in cors),
    )
    timeouts = _timeouts(_table(raw.get("timeouts", {}), "timeouts"), "timeouts", Timeouts())

    providers: dict[str, ProviderConfig] = {}
    for name, p in _table(raw.get("providers", {}), "providers").items():
        path = f"providers.{name}"
        p = _table(p, path)
        _unknown(p, {"base_url", "api_key_env", "timeouts", "apis"}, path)
        apis = p.get("apis", list(API_NAMES))
        if not isinstance(apis, list) or not apis or not all(a in API_NAMES for a in apis):
            raise ConfigError(
                f"{path}.apis: expected a non-empty list of {', '.join(API_NAMES)}, got {apis!r}"
            )
        base_url = _str(p, "base_url", path)
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{path}.base_url: expected an http:// or https:// URL, got {base_url!r}")
        providers[name] = ProviderConfig(
            name=name,
            base_url=base_url,
            api_key_env=_str(p, "api_key_env", path),
            timeouts=_timeouts(
                _table(p.get("timeouts", {}), f"{path}.timeouts"), f"{path}.timeouts", timeouts
            ),
            apis=tuple(dict.fromkeys(apis)),
        )
    if not providers:
        raise ConfigError("providers: at least one provider is required")

    models: dict[str, ModelConfig] = {}
    for name, m in _table(raw.get("models", {}), "models").items():
        path = f'models."{name}"'
        m = _table(m, path)
        _unknown(
            m,
            {
                "input_usd_per_mtok", "output_usd_per_mtok", "context_window", "max_output_tokens",
                "serve", "tags", "quality", "description",
            },
            path,
        )  # fmt: skip
        if name.startswith(VIRTUAL_PREFIX):
            raise ConfigError(f"{path}: names starting with {VIRTUAL_PREFIX!r} are reserved for routes")
        serve_raw = m.get("serve")
        if not isinstance(serve_raw, list) or not serve_raw:
            raise ConfigError(f"{path}.serve: expected a non-empty list of {{provider, model}} tables")
        serve: list[Serve] = []
        for i, sv in enumerate(serve_raw):
            sp = f"{path}.serve[{i}]"
            sv = _table(sv, sp)
            _unknown(sv, {"provider", "model"}, sp)
            prov = _str(sv, "provider", sp)
            if prov not in providers:
                raise ConfigError(f"{sp}.provider: unknown provider {prov!r} (have: {', '.join(providers)})")
            serve.append(Serve(provider=prov, model=_str(sv, "model", sp, name) or name))
        tags = m.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ConfigError(f"{path}.tags: expected a list of strings")
        models[name] = ModelConfig(
            name=name,
            input_usd_per_mtok=_num(m, "input_usd_per_mtok", path, 0.0),
            output_usd_per_mtok=_num(m, "output_usd_per_mtok", path, 0.0),
            context_window=_int(m, "context_window", path, 128000, lo=1),
            max_output_tokens=_int(m, "max_output_tokens", path, 16384, lo=1),
            serve=tuple(serve),
            tags=tuple(tags),
            quality=_num(m, "quality", path, 0.5, hi=1.0),
            description=_str(m, "description", path, "") or "",
        )
    if not models:
        raise ConfigError("models: at least one model is required")

    routes: dict[str, RouteConfig] = {}
    for name, r in _table(raw.get("routes", {}), "routes").items():
        path = f'routes."{name}"'
        routes[name] = _route(name, _table(r, path), path, models)
    for name, strategy in (
        ("gammainfra/fast", "hedge"),
        ("gammainfra/cheap", "cheapest"),
        ("gammainfra/auto", "auto"),
    ):
        routes.setdefault(name, RouteConfig(name=name, strategy=strategy, candidates=tuple(models)))
    for name in routes:
        if name in models:
            raise ConfigError(f'routes."{name}": a route cannot have the same name as a model')

    f = _table(raw.get("feedback", {}), "feedback")
    _unknown(
        f,
        {
            "half_life_s",
            "order_half_life_samples",
            "min_samples",
            "failure_threshold",
            "base_backoff_s",
            "max_backoff_s",
        },
        "feedback",
    )
    feedback = FeedbackConfig(
        half_life_s=_num(f, "half_life_s", "feedback", 10.0, lo=0.1),
        order_half_life_samples=_num(f, "order_half_life_samples", "feedback", 2.0, lo=1.0),
        min_samples=_num(f, "min_samples", "feedback", 3.0, lo=0.5),
        failure_threshold=_int(f, "failure_threshold", "feedback", 5, lo=1),
        base_backoff_s=_num(f, "base_backoff_s", "feedback", 1.0, lo=0.01),
        max_backoff_s=_num(f, "max_backoff_s", "feedback", 60.0, lo=0.01),
    )
    shared = _shared(_table(raw["shared"], "shared")) if "shared" in raw else None
    a = _table(raw.get("apis", {}), "apis")
    _unknown(a, {"affinity_max_entries", "affinity_max_age_s", "lacking_ttl_s"}, "apis")
    apis_cfg = ApisConfig(
        affinity_max_entries=_int(a, "affinity_max_entries", "apis", 100_000, lo=1),
        affinity_max_age_s=_num(a, "affinity_max_age_s", "apis", 30 * 86400.0, lo=1.0),
        lacking_ttl_s=_num(a, "lacking_ttl_s", "apis", 300.0, lo=0.0),
    )
    return Config(
        server=server, providers=providers, models=models, routes=routes, feedback=feedback, shared=shared,
        apis=apis_cfg,
    )  # fmt: skip


def _shared(d: dict[str, Any]) -> SharedConfig:
    """[shared] (optional): Redis URL, password variable, sync interval, key prefix, forget-after."""
    from urllib.parse import urlsplit

    path = "shared"
    _unknown(
        d,
        {"redis_url", "password_env", "sync_interval_ms", "key_prefix", "forget_after_s", "timeout_ms"},
        path,
    )
    url = _str(d, "redis_url", path)
    if not url or not url.startswith(("redis://", "rediss://")):
        # the value is not echoed: it may hold a secret
        raise ConfigError(f"{path}.redis_url: expected a redis:// or rediss:// URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{path}.redis_url: not a valid URL") from None
    if parts.password:
        raise ConfigError(
            f"{path}.redis_url: must not contain a password; name an environment variable in "
            f"{path}.password_env instead"
        )
    interval = _num(d, "sync_interval_ms", path, 250.0, lo=10.0, hi=60_000.0)
    prefix = _str(d, "key_prefix", path, "hedge:")
    if not prefix:
        raise ConfigError(f"{path}.key_prefix: must not be empty")
    forget = _num(d, "forget_after_s", path, 30.0, lo=1.0, hi=86_400.0)
    if forget * 1000 < 2 * interval:
        raise ConfigError(f"{path}.forget_after_s: must be at least two sync intervals")
    return SharedConfig(
        redis_url=url,
        password_env=_str(d, "password_env", path),
        sync_interval_ms=interval,
        key_prefix=prefix,
        forget_after_s=forget,
        timeout_ms=_num(d, "timeout_ms", path, 1000.0, lo=10.0, hi=60_000.0),
    )


def _route(name: str, r: dict[str, Any], path: str, models: dict[str, ModelConfig]) -> RouteConfig:
    _unknown(
        r,
        {
            "strategy", "candidates", "quantile", "min_delay_ms", "max_delay_ms", "default_delay_ms",
            "max_attempts", "hedge_budget", "hedge_burst",
        },
        path,
    )  # fmt: skip
    strategy = _str(r, "strategy", path, "hedge")
    if strategy not in STRATEGIES:
        raise ConfigError(f"{path}.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    cands = r.get("candidates", list(models))
    if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
        raise ConfigError(f"{path}.candidates: expected a non-empty list of model names")
    for c in cands:
        if c not in models:
            raise ConfigError(f"{path}.candidates: unknown model {c!r}")
    route = RouteConfig(
        name=name,
        strategy=strategy,
        candidates=tuple(cands),
        quantile=_num(r, "quantile", path, 0.95, lo=0.01, hi=0.999),
        min_delay_ms=_num(r, "min_delay_ms", path, 25.0),
        max_delay_ms=_num(r, "max_delay_ms", path, 3000.0),
        default_delay_ms=_num(r, "default_delay_ms", path, 500.0),
        max_attempts=_int(r, "max_attempts", path, 3, lo=1, hi=16),
        hedge_budget=_num(r, "hedge_budget", path, 0.10, hi=1.0),
        hedge_burst=_num(r, "hedge_burst", path, 5.0, lo=1.0),
    )
    if route.min_delay_ms > route.max_delay_ms:
        raise ConfigError(f"{path}.min_delay_ms: must not exceed max_delay_ms ({route.max_delay_ms})")
    return route


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; errors carry the file name and the key."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return parse_config(raw)
