"""The upstream HTTP client behind one small interface (DESIGN §7).

open an attempt -> status/headers -> read chunks -> abort. Everything else in the proxy talks to this
interface only, so the transport can be swapped for a leaner asyncio-protocol client if the benchmark
says so. The aiohttp implementation keeps one pooled `ClientSession` for the whole process.

`abort()` closes the TCP connection instead of returning it to the pool: that is how a losing or
abandoned attempt tells the provider to stop generating (and stop billing).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Protocol

import aiohttp


class UpstreamError(Exception):
    """A transport-level failure before a usable response: connect refused, reset, timeout."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason  # connect | timeout | reset


class ChunkReader(Protocol):
    async def read_chunk(self) -> bytes: ...


class Response(ChunkReader, Protocol):
    """What both upstream clients hand back from `open` (the interface of DESIGN §7)."""

    status: int
    headers: Mapping[str, str]

    async def read_all(self, limit: int) -> bytes: ...
    def release(self) -> None: ...
    def abort(self) -> None: ...


async def read_body(resp: ChunkReader, limit: int) -> bytes:
    """Read a response to its end, refusing more than `limit` bytes: both clients' `read_all`."""
    parts: list[bytes] = []
    size = 0
    while chunk := await resp.read_chunk():
        size += len(chunk)
        if size > limit:
            raise UpstreamError("too_large", f"upstream body exceeds {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


class UpstreamResponse:
    """One open upstream response. Read with `read_chunk` until b""; then `release` or `abort`."""

    __slots__ = ("_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def read_chunk(self) -> bytes:
        """Whatever bytes have arrived (at least one), or b"" at the end of the body."""
        try:
            return await self._resp.content.readany()
        except TimeoutError:
            raise UpstreamError("timeout", "upstream went silent for longer than the idle timeout") from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionError) as e:
            raise UpstreamError("reset", f"upstream connection broke mid-body: {type(e).__name__}") from None

    async def read_all(self, limit: int) -> bytes:
        """The whole body, refusing more than `limit` bytes (a bounded buffer for non-streaming)."""
        return await read_body(self, limit)

    def release(self) -> None:
        """Body fully read: give the connection back to the pool."""
        self._resp.release()

    def abort(self) -> None:
        """Close the connection now so the provider sees the disconnect and stops generating."""
        self._resp.close()


class Upstream:
    """A pooled aiohttp client. One per process; `open` is the only way out to a provider."""

    def __init__(self, *, pool_limit: int = 0, keepalive_s: float = 30.0) -> None:
        self._pool_limit = pool_limit
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._pool_limit,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_s,
                ttl_dns_cache=300,
                family=socket.AF_UNSPEC,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def open(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> UpstreamResponse:
        """POST `body` and wait for the response status and headers.

        `read_timeout` bounds every silence on the socket (headers and body): the idle timeout."""
        session = self._get_session()
        try:
            resp = await session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=connect_timeout, sock_read=read_timeout
                ),
                allow_redirects=False,
            )
        except TimeoutError as e:  # sock_read while waiting for headers, or connect
            raise UpstreamError(
                "timeout", f"upstream timed out before headers ({type(e).__name__})"
            ) from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamError("connect", f"cannot connect to upstream ({type(e).__name__})") from None
        except (aiohttp.ClientError, ConnectionError) as e:
            raise UpstreamError("reset", f"upstream failed before headers ({type(e).__name__})") from None
        return UpstreamResponse(resp)

    def pool_size(self) -> int:
        """Idle + busy pooled connections (tests use it to prove nothing leaks)."""
        s = self._session
        if s is None or s.closed:
            return 0
        conn = s.connector
        if conn is None:
            return 0
        acquired = len(getattr(conn, "_acquired", ()))
        idle = sum(len(v) for v in getattr(conn, "_conns", {}).values())
        return acquired + idle

    def busy_connections(self) -> int:
        s = self._session
        if s is None or s.closed or s.connector is None:
            return 0
        return len(getattr(s.connector, "_acquired", ()))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
