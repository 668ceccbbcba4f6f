"""Configuration: the TOML contract (docs/design.md, "Configuration"), loaded into frozen dataclasses.

Validation happens once at start-up and every problem names the exact key, so a typo in a config never
turns into a 500 at request time. Everything has a default except what only the operator can know
(provider URLs, model prices).

The dataclasses are the contract: a field is a TOML key of its table (`setting(key=...)` when the names
differ), its default is the TOML default (`setting(toml_default=...)` only where Python callers must pass
the value but TOML may leave it out), and its bounds and choices sit in the field's metadata. `_section`
derives the allowed keys, the defaults and the checks from them, so no default and no key list is written
twice; the few rules that span keys or tables (URLs, references between tables) are code below.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

STRATEGIES = ("hedge", "failover", "cheapest", "auto")
VIRTUAL_PREFIX = "gammainfra/"
# the OpenAI APIs the gateway serves (dialect names; hedge/dialects.py, hedge/apisupport.py)
API_NAMES = ("chat", "responses", "completions", "embeddings")
NOT_A_KEY: Mapping[str, Any] = {"not_a_key": True}  # metadata of a field the parser sets (a table's name)


def setting(
    default: Any = MISSING,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] = (),
    key: str | None = None,
    scale: float = 1.0,
    toml_default: Any = MISSING,
    blank_is_default: bool = False,
) -> Any:
    """A dataclass field that is also a TOML key: its default, bounds [lo, hi], allowed values, TOML name
    (`key`, when it differs) and unit (`scale`: TOML value = field value x scale, e.g. ms for seconds)."""
    meta = {
        "key": key,
        "lo": lo,
        "hi": hi,
        "choices": choices,
        "scale": scale,
        "toml_default": toml_default,
        "blank_is_default": blank_is_default,
    }
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A config problem; the message starts with the dotted key that is wrong."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds (milliseconds in TOML). Defaults suit LLM APIs: connecting is fast,
    thinking is not. `[timeouts]` sets them for every provider, `[providers.x.timeouts]` for one."""

    connect: float = setting(5.0, key="connect_ms", scale=1000, lo=1)
    first_token: float = setting(60.0, key="first_token_ms", scale=1000, lo=1)
    idle: float = setting(60.0, key="idle_ms", scale=1000, lo=1)
    total: float = setting(600.0, key="total_ms", scale=1000, lo=1)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = setting("127.0.0.1", blank_is_default=True)  # never "" (which would bind every address)
    port: int = setting(8080, hi=65535)
    api_keys_env: str | None = "HEDGE_API_KEYS"
    max_body_bytes: int = setting(32 * 1024 * 1024, lo=1024)
    max_concurrency: int = setting(2000, lo=1)
    shutdown_grace_s: float = 30.0
    access_log: bool = False
    upstream_client: str = setting("fast", choices=("fast", "aiohttp"))  # raw asyncio protocol | aiohttp
    # what a caller can hold (issue 13; hedge/conn_limits.py, hedge/body.py)
    header_timeout_s: float = setting(10.0, lo=0.01)  # first byte of a request head -> its end
    body_timeout_s: float = setting(60.0, lo=0.01)  # head parsed -> the whole body read
    keepalive_timeout_s: float = setting(15.0, lo=0.01)  # idle connection between requests (and before)
    max_connections: int = setting(10000, lo=1)  # per process; clamped to half the fd limit at start-up
    max_messages: int = setting(4096, lo=1)  # entries of `messages`
    max_json_items: int = setting(200_000, lo=16)  # bound on JSON values, checked before the body is parsed
    shutdown_write_timeout_s: float = setting(2.0, lo=0.01)  # a stream's last words at shutdown, then abort
    cors_origins: tuple[str, ...] = ()  # empty = no CORS; "*" = any origin


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str = field(metadata=NOT_A_KEY)
    base_url: str = setting()
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
    provider: str = setting()
    model: str = setting(blank_is_default=True)  # TOML default: the model's own name


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str = field(metadata=NOT_A_KEY)
    input_usd_per_mtok: float = setting(toml_default=0.0)
    output_usd_per_mtok: float = setting(toml_default=0.0)
    context_window: int = setting(toml_default=128000, lo=1)
    max_output_tokens: int = setting(toml_default=16384, lo=1)
    serve: tuple[Serve, ...] = setting()
    tags: tuple[str, ...] = ()
    quality: float = setting(0.5, hi=1.0)
    description: str = ""


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str = field(metadata=NOT_A_KEY)
    strategy: str = setting(toml_default="hedge", choices=STRATEGIES)
    candidates: tuple[str, ...] = setting()  # TOML default: every model
    quantile: float = setting(0.95, lo=0.01, hi=0.999)
    min_delay_ms: float = 25.0
    max_delay_ms: float = 3000.0
    default_delay_ms: float = 500.0
    max_attempts: int = setting(3, lo=1, hi=16)
    hedge_budget: float = setting(0.10, hi=1.0)
    hedge_burst: float = setting(5.0, lo=1.0)


@dataclass(frozen=True, slots=True)
class FeedbackConfig:
    """How fast statistics forget and how eagerly breakers open."""

    half_life_s: float = setting(10.0, lo=0.1)
    order_half_life_samples: float = setting(2.0, lo=1.0)
    min_samples: float = setting(3.0, lo=0.5)
    failure_threshold: int = setting(5, lo=1)
    base_backoff_s: float = setting(1.0, lo=0.01)
    max_backoff_s: float = setting(60.0, lo=0.01)


@dataclass(frozen=True, slots=True)
class SharedConfig:
    """[shared]: instances pool their statistics and breaker openings through Redis (hedge/shared.py).

    The password never sits in the config (or the URL): it is read from the environment variable named
    by ``password_env`` when the client connects.
    """

    redis_url: str = setting()
    password_env: str | None = None
    sync_interval_ms: float = setting(250.0, lo=10.0, hi=60_000.0)
    key_prefix: str = "hedge:"
    # a stopped instance's contribution expires (Redis key TTL) after this
    forget_after_s: float = setting(30.0, lo=1.0, hi=86_400.0)
    # one sync round trip; a slower Redis counts as down for that round
    timeout_ms: float = setting(1000.0, lo=10.0, hi=60_000.0)

    def password(self) -> str | None:
        """Read at connect time; never logged."""
        return os.environ.get(self.password_env) if self.password_env else None


@dataclass(frozen=True, slots=True)
class ApisConfig:
    """[apis]: where response ids live and how long a provider's 404/405 for a path is believed.

    `affinity_max_entries` / `affinity_max_age_s` bound the response id -> provider map
    (hedge/affinity.py); `lacking_ttl_s` is how long a (provider, API) pair that answered 404/405 for
    the path is skipped before it is tried again (hedge/apisupport.py)."""

    affinity_max_entries: int = setting(100_000, lo=1)
    affinity_max_age_s: float = setting(30 * 86400.0, lo=1.0)
    lacking_ttl_s: float = setting(300.0, lo=0.0)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    routes: dict[str, RouteConfig]
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    shared: SharedConfig | None = None
    apis: ApisConfig = field(default_factory=ApisConfig)


# ------------------------------------------------------------------------------- the derived reader


@dataclass(frozen=True, slots=True)
class _Key:
    """One TOML key of a table, derived from its dataclass field."""

    name: str  # the field
    key: str  # the TOML key
    hint: Any  # the field's type
    default: Any  # in field units; MISSING when the key is required
    lo: float | None
    hi: float | None
    choices: tuple[str, ...]
    scale: float
    blank_is_default: bool


@cache
def _keys(cls: type) -> tuple[_Key, ...]:
    """The TOML keys of a dataclass, once per class."""
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        m = f.metadata
        if m.get("not_a_key"):
            continue
        default = f.default
        if default is MISSING and f.default_factory is not MISSING:
            default = f.default_factory()
        if m.get("toml_default", MISSING) is not MISSING:
            default = m["toml_default"]
        out.append(
            _Key(
                name=f.name,
                key=m.get("key") or f.name,
                hint=hints[f.name],
                default=default,
                lo=m.get("lo"),
                hi=m.get("hi"),
                choices=m.get("choices", ()),
                scale=m.get("scale", 1.0),
                blank_is_default=m.get("blank_is_default", False),
            )
        )
    return tuple(out)


def _table(d: Any, path: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a table, got {type(d).__name__}")
    return d


def _unknown(d: dict[str, Any], allowed: set[str], path: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise ConfigError(f"{path}.{extra[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _value(k: _Key, v: Any, where: str) -> Any:
    """One key's value, checked against its field's type, bounds and choices, in field units."""
    hint = k.hint
    if hint is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true or false, got {v!r}")
        return v
    if hint is int or hint is float:
        if hint is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{where}: expected an integer, got {v!r}")
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
            raise ConfigError(f"{where}: expected a number, got {v!r}")
        lo = (0 if hint is int else 0.0) if k.lo is None else k.lo
        hi = (2**31 if hint is int else math.inf) if k.hi is None else k.hi
        if not lo <= v <= hi:
            raise ConfigError(f"{where}: {v!r} is out of range [{lo}, {hi}]")
        return v if hint is int else float(v) / k.scale
    if hint in (str, str | None):
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{where}: expected a string, got {v!r}")
        if k.choices and v not in k.choices:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(k.choices)}")
        return v
    if hint == tuple[str, ...]:
        if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{where}: expected a list of strings")
        return tuple(v)
    raise TypeError(f"{where}: no reader for {hint!r}; pass the value to _section")  # a bug, not a config


def _section(
    cls: type,
    d: dict[str, Any],
    path: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    **given: Any,
) -> Any:
    """Build `cls` from TOML table `d`: unknown keys are refused naming their path, every other field is
    read by `_value` (missing: its default, or `defaults[field]`), except the fields in `given`, which the
    caller has read itself (names, nested tables, references to other tables)."""
    keys = _keys(cls)
    _unknown(d, {k.key for k in keys}, path)
    values = dict(given)
    for k in keys:
        if k.name in given:
            continue
        default = (defaults or {}).get(k.name, k.default)
        if k.key not in d:
            if default is MISSING:
                default = None  # required: the caller's check names it (e.g. "expected a URL, got None")
            values[k.name] = default
            continue
        v = _value(k, d[k.key], f"{path}.{k.key}")
        if k.blank_is_default and v == "":
            v = default
        values[k.name] = v
    return cls(**values)


def _timeouts(d: Any, path: str, base: Timeouts) -> Timeouts:
    t: Timeouts = _section(
        Timeouts, _table(d, path), path, defaults={f.name: getattr(base, f.name) for f in fields(Timeouts)}
    )
    return t


# ---------------------------------------------------------------------------------------------- loader

TABLES = {f.name for f in fields(Config)} | {"timeouts"}  # [timeouts]: every provider's defaults


def parse_config(raw: dict[str, Any]) -> Config:
    """Turn a parsed TOML document into a validated Config (raises ConfigError naming the key)."""
    _unknown(raw, TABLES, "config")
    server = _server(_table(raw.get("server", {}), "server"))
    providers = _providers(raw)
    models = {
        name: _model(name, _table(m, f'models."{name}"'), f'models."{name}"', providers)
        for name, m in _table(raw.get("models", {}), "models").items()
    }
    if not models:
        raise ConfigError("models: at least one model is required")
    routes = {
        name: _route(name, _table(r, f'routes."{name}"'), f'routes."{name}"', models)
        for name, r in _table(raw.get("routes", {}), "routes").items()
    }
    for name, strategy in (
        ("gammainfra/fast", "hedge"),
        ("gammainfra/cheap", "cheapest"),
        ("gammainfra/auto", "auto"),
    ):
        routes.setdefault(name, RouteConfig(name=name, strategy=strategy, candidates=tuple(models)))
    for name in routes:
        if name in models:
            raise ConfigError(f'routes."{name}": a route cannot have the same name as a model')
    feedback: FeedbackConfig = _section(
        FeedbackConfig, _table(raw.get("feedback", {}), "feedback"), "feedback"
    )
    shared = _shared(_table(raw["shared"], "shared")) if "shared" in raw else None
    apis: ApisConfig = _section(ApisConfig, _table(raw.get("apis", {}), "apis"), "apis")
    return Config(
        server=server, providers=providers, models=models, routes=routes, feedback=feedback, shared=shared,
        apis=apis,
    )  # fmt: skip


def _server(s: dict[str, Any]) -> ServerConfig:
    cors = s.get("cors_origins", [])
    if not isinstance(cors, list) or not all(isinstance(o, str) and o for o in cors):
        raise ConfigError(f'server.cors_origins: expected a list of origins (or ["*"]), got {cors!r}')
    server: ServerConfig = _section(
        ServerConfig, s, "server", cors_origins=tuple(o.rstrip("/") for o in cors)
    )
    return server


def _providers(raw: dict[str, Any]) -> dict[str, ProviderConfig]:
    timeouts = _timeouts(raw.get("timeouts", {}), "timeouts", Timeouts())
    providers: dict[str, ProviderConfig] = {}
    for name, p in _table(raw.get("providers", {}), "providers").items():
        path = f"providers.{name}"
        p = _table(p, path)
        own = _timeouts(p.get("timeouts", {}), f"{path}.timeouts", timeouts)
        apis = p.get("apis", list(API_NAMES))
        if not isinstance(apis, list) or not apis or not all(a in API_NAMES for a in apis):
            raise ConfigError(
                f"{path}.apis: expected a non-empty list of {', '.join(API_NAMES)}, got {apis!r}"
            )
        provider: ProviderConfig = _section(
            ProviderConfig, p, path, name=name, timeouts=own, apis=tuple(dict.fromkeys(apis))
        )
        if not provider.base_url or not provider.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{path}.base_url: expected an http:// or https:// URL, got {provider.base_url!r}"
            )
        providers[name] = provider
    if not providers:
        raise ConfigError("providers: at least one provider is required")
    return providers


def _model(name: str, m: dict[str, Any], path: str, providers: dict[str, ProviderConfig]) -> ModelConfig:
    if name.startswith(VIRTUAL_PREFIX):
        raise ConfigError(f"{path}: names starting with {VIRTUAL_PREFIX!r} are reserved for routes")
    _unknown(m, {k.key for k in _keys(ModelConfig)}, path)
    serve_raw = m.get("serve")
    if not isinstance(serve_raw, list) or not serve_raw:
        raise ConfigError(f"{path}.serve: expected a non-empty list of {{provider, model}} tables")
    serve: list[Serve] = []
    for i, sv in enumerate(serve_raw):
        sp = f"{path}.serve[{i}]"
        one: Serve = _section(Serve, _table(sv, sp), sp, defaults={"model": name})
        if one.provider not in providers:
            raise ConfigError(
                f"{sp}.provider: unknown provider {one.provider!r} (have: {', '.join(providers)})"
            )
        serve.append(one)
    model: ModelConfig = _section(ModelConfig, m, path, name=name, serve=tuple(serve))
    return model


def _route(name: str, r: dict[str, Any], path: str, models: dict[str, ModelConfig]) -> RouteConfig:
    _unknown(r, {k.key for k in _keys(RouteConfig)}, path)
    cands = r.get("candidates", list(models))
    if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
        raise ConfigError(f"{path}.candidates: expected a non-empty list of model names")
    for c in cands:
        if c not in models:
            raise ConfigError(f"{path}.candidates: unknown model {c!r}")
    route: RouteConfig = _section(RouteConfig, r, path, name=name, candidates=tuple(cands))
    if route.min_delay_ms > route.max_delay_ms:
        raise ConfigError(f"{path}.min_delay_ms: must not exceed max_delay_ms ({route.max_delay_ms})")
    return route


def _shared(d: dict[str, Any]) -> SharedConfig:
    """[shared] (optional): Redis URL, password variable, sync interval, key prefix, forget-after."""
    from urllib.parse import urlsplit

    path = "shared"
    _unknown(d, {k.key for k in _keys(SharedConfig)}, path)
    url = d.get("redis_url")
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://")):
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
    shared: SharedConfig = _section(SharedConfig, d, path)
    if not shared.key_prefix:
        raise ConfigError(f"{path}.key_prefix: must not be empty")
    if shared.forget_after_s * 1000 < 2 * shared.sync_interval_ms:
        raise ConfigError(f"{path}.forget_after_s: must be at least two sync intervals")
    return shared


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
