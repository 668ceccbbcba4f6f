"""The upstream HTTP client behind one small interface (docs/design.md, "Upstream client").

open an attempt -> status/headers -> read chunks -> release or abort; `close()` ends the client. The
rest of the proxy talks to this interface only. Two implementations exist, chosen by name from
`CLIENTS` (`server.upstream_client` in the config): "fast", the lean client on asyncio protocols
(`fastclient.py`, the default), and "aiohttp", aiohttp's `ClientSession` (`aiohttp_client.py`).

`abort()` closes the TCP connection instead of returning it to the pool: that is how a losing or
abandoned attempt tells the provider to stop generating (and stop billing).

This module imports neither client (their factories import them when called), nor aiohttp.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from .upstream_errors import (
    ConnectError,
    ConnectTimeout,
    ProtocolError,
    ReadReset,
    ReadTimeout,
    TooLarge,
    UpstreamError,
    UpstreamTimeout,
)

__all__ = [
    "CLIENTS",
    "ConnectError",
    "ConnectTimeout",
    "ProtocolError",
    "ReadReset",
    "ReadTimeout",
    "TooLarge",
    "UpstreamError",
    "UpstreamTimeout",
    "make_client",
    "read_body",
]


class ChunkReader(Protocol):
    async def read_chunk(self) -> bytes: ...


class Response(ChunkReader, Protocol):
    """What every upstream client hands back from `open`."""

    status: int
    headers: Mapping[str, str]

    async def read_all(self, limit: int) -> bytes: ...
    def release(self) -> None: ...
    def abort(self) -> None: ...


class UpstreamClient(Protocol):
    """A pooled HTTP client to the providers. One per process (per worker)."""

    async def open(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> Response:
        """POST `body` and wait for the status and headers. `read_timeout` bounds every silence on
        the socket (headers and body). Raises an `UpstreamError` subclass."""
        ...

    def pool_size(self) -> int:
        """Idle + busy pooled connections (tests use it to prove nothing leaks)."""
        ...

    def busy_connections(self) -> int: ...

    async def close(self) -> None:
        """Close every connection, idle or busy; in-flight reads fail."""
        ...


async def read_body(resp: ChunkReader, limit: int) -> bytes:
    """Read a response to its end, refusing more than `limit` bytes: both clients' `read_all`.

    Raises `TooLarge` past the limit, and whatever `read_chunk` raises: `ReadTimeout` (silence),
    `ReadReset` (the connection broke) or `ProtocolError` (a malformed body)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await resp.read_chunk():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"upstream body exceeds {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _fast() -> UpstreamClient:
    from .fastclient import FastUpstream

    return FastUpstream()


def _aiohttp() -> UpstreamClient:
    from .aiohttp_client import AiohttpUpstream

    return AiohttpUpstream()


CLIENTS: dict[str, Callable[[], UpstreamClient]] = {"fast": _fast, "aiohttp": _aiohttp}


def make_client(name: str) -> UpstreamClient:
    """The client registered under `name` (config.py validates the name at load time)."""
    try:
        factory = CLIENTS[name]
    except KeyError:
        raise ValueError(f"unknown upstream client {name!r}: one of {', '.join(CLIENTS)}") from None
    return factory()
