"""Gateway keys: `Authorization: Bearer sk-gammainfra-...` checked in constant time.

Keys come from an environment variable (comma-separated), never from the config file, so the config can
be committed. With no keys configured the gateway is open (local use), as docs/design.md "Configuration" says.
Per-key metrics use a short id (the first 8 hex digits of the key's SHA-256), never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from .errors import ApiError


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def keys_from_env(var: str | None) -> tuple[str, ...]:
    if not var:
        return ()
    return tuple(k.strip() for k in os.environ.get(var, "").split(",") if k.strip())


class KeyChecker:
    __slots__ = ("_ids", "_keys")

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(k.encode() for k in keys)
        self._ids = tuple(key_id(k) for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The key id of a valid key; None when auth is off; raises 401 otherwise.

        Every configured key is compared (no early exit) with `hmac.compare_digest`, so the time taken
        does not tell an attacker which key, or how much of one, matched.
        """
        if not self._keys:
            return None
        if not authorization:
            raise ApiError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer sk-gammainfra-...'.",
                code="missing_api_key",
            )
        scheme, _, token = authorization.partition(" ")
        presented = token.strip().encode() if scheme.lower() == "bearer" else b""
        found = -1
        for i, k in enumerate(self._keys):
            if hmac.compare_digest(presented, k):
                found = i
        if found < 0:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return self._ids[found]
