"""Keeping provider keys out of everything we emit.

Provider keys live only in the environment and in the Authorization header of upstream requests. Any text
that came from outside (an upstream error message we pass on) goes through a `Scrubber` first, in case a
provider echoes the key back (some do, partially masked or not).

A stream after commit is forwarded as bytes, and its events are not parsed; the proxy still replaces the
winning provider's own key wherever it appears whole in a chunk (`dialects.StreamForwarder`: one `bytes in`
per chunk, and chunks are cut on event boundaries, so a key inside one event is inside one chunk). Only
the whole key: its masked-middle form keeps nothing secret beyond its first 8 characters, and replacing
those in streamed content would edit innocent text (`sk-proj-` is every key's head).
"""

from __future__ import annotations

from collections.abc import Iterable

from .config import ProviderConfig

MIN_SECRET_LEN = 8  # shorter values would scrub innocent words
REDACTED = b"[redacted]"


class Scrubber:
    __slots__ = ("_secrets",)

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(
            sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
        )

    @classmethod
    def from_providers(cls, providers: Iterable[ProviderConfig]) -> Scrubber:
        return cls(k for p in providers if (k := p.api_key()))

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, "[redacted]")
            # a key echoed with its middle masked still starts with its first 8 characters
            head = s[:8]
            if len(s) > 12 and head in text:
                text = text.replace(head, "[redacted]")
        return text
