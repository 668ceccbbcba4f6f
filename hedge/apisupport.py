"""Which candidate serves which API: what config says, what the model is, and what providers showed.

Not every provider serves every OpenAI API (many compatible servers have chat completions but no
`/v1/responses`), and an embedding model answers no chat. A race must only start candidates that can
answer, so candidates are filtered per API by three rules, all of which must allow it:

1. the provider's `apis` list from config (default: all APIs; `ApiSupport.from_config`);
2. the model's kind: a model tagged `embeddings` serves only `/v1/embeddings`, any other model every
   API but that one (`model_apis`);
3. what a provider showed: a 404 or 405 *for the path* (not for a model or a response id) marks the
   (provider, API) pair as lacking for `lacking_ttl_s`, so the next requests skip it and a later one
   tries again -- a provider may be upgraded, and a wrong guess must not last.

Sans-IO: plain data and an injected clock; the proxy reports statuses, this module answers questions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import orjson

from .catalog import Candidate
from .config import API_NAMES, Config, ModelConfig

ALL_APIS = frozenset(API_NAMES)
API_PATHS = {
    "chat": "/chat/completions",
    "responses": "/responses",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
EMBEDDINGS_TAG = "embeddings"
_EMBEDDINGS_ONLY = frozenset({"embeddings"})
_ALL_BUT_EMBEDDINGS = ALL_APIS - _EMBEDDINGS_ONLY  # built once: asked for every candidate of a request
# Error codes and params that say "the path exists, the thing you named does not"
_RESOURCE_CODES = frozenset({"model_not_found", "previous_response_not_found"})
_RESOURCE_PARAMS = frozenset({"model", "previous_response_id", "response_id"})


def api_url(base_url: str, api: str) -> str:
    """The provider URL of an API, as `ProviderConfig.chat_url` is for chat."""
    return base_url.rstrip("/") + API_PATHS[api]


def model_apis(model: ModelConfig) -> frozenset[str]:
    """The APIs a model can answer at all, from its kind (tagged `embeddings` or not)."""
    return _EMBEDDINGS_ONLY if EMBEDDINGS_TAG in model.tags else _ALL_BUT_EMBEDDINGS


def lacks_path(status: int, error_body: bytes | None) -> bool:
    """Does this answer say the provider has no such endpoint (rather than no such model or response)?

    405 always does. A 404 does unless its OpenAI error names a model or a response: OpenAI answers an
    unknown model with 404 too, and that is about the model, not about the provider's API.
    """
    if status == 405:
        return True
    if status != 404:
        return False
    try:
        doc = orjson.loads(error_body or b"")
    except orjson.JSONDecodeError:
        return True  # an HTML or text 404 page: a server that does not know the path
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return True
    return err.get("code") not in _RESOURCE_CODES and err.get("param") not in _RESOURCE_PARAMS


class ApiSupport:
    """Answers "may this candidate be raced for this API now?"; learns from 404/405 answers."""

    __slots__ = ("_clock", "_lacking", "lacking_ttl_s", "provider_apis")

    def __init__(
        self,
        provider_apis: Mapping[str, Iterable[str]] | None = None,
        *,
        lacking_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider_apis = {p: frozenset(apis) for p, apis in (provider_apis or {}).items()}
        for p, apis in self.provider_apis.items():
            unknown = apis - ALL_APIS
            if unknown:
                raise ValueError(
                    f"provider {p!r}: unknown APIs {sorted(unknown)}; known: {', '.join(API_NAMES)}"
                )
        self.lacking_ttl_s = lacking_ttl_s
        self._clock = clock
        self._lacking: dict[tuple[str, str], float] = {}  # (provider, api) -> until when it is skipped

    @classmethod
    def from_config(cls, config: Config, clock: Callable[[], float] = time.monotonic) -> ApiSupport:
        return cls(
            {name: p.apis for name, p in config.providers.items()},
            lacking_ttl_s=config.apis.lacking_ttl_s,
            clock=clock,
        )

    def configured(self, c: Candidate, api: str) -> bool:
        """Rules 1 and 2 only: config and the model's kind (what no answer of a provider changes)."""
        return api in self.provider_apis.get(c.provider.name, ALL_APIS) and api in model_apis(c.model)

    def serves(self, c: Candidate, api: str) -> bool:
        if not self.configured(c, api):
            return False
        until = self._lacking.get((c.provider.name, api))
        if until is None:
            return True
        if self._clock() >= until:
            del self._lacking[(c.provider.name, api)]
            return True
        return False

    def candidates(self, cands: Iterable[Candidate], api: str) -> tuple[Candidate, ...]:
        """The candidates that may be raced for `api`, in their order."""
        return tuple(c for c in cands if self.serves(c, api))

    def observe(self, provider: str, api: str, status: int, error_body: bytes | None) -> bool:
        """Report an upstream answer; True when it marked the provider as lacking the API."""
        if not lacks_path(status, error_body):
            return False
        self._lacking[(provider, api)] = self._clock() + self.lacking_ttl_s
        return True
