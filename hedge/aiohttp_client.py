"""The upstream client on aiohttp's `ClientSession` (`server.upstream_client = "aiohttp"`).

The same `upstream.UpstreamClient` interface as the lean client, kept as the well-trodden alternative
and as a reference in tests. aiohttp's exceptions become typed upstream errors in one mapping each for
"before the headers" and "in the body" (httpcore's `map_exceptions` pattern).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

import aiohttp

from .upstream import read_body
from .upstream_errors import (
    ConnectError,
    ConnectTimeout,
    ExceptionMapping,
    ReadReset,
    ReadTimeout,
    map_exceptions,
)

# The first match wins: aiohttp's timeouts are also ClientErrors, and ClientConnectorError is one too.
_BEFORE_HEADERS: ExceptionMapping = {
    aiohttp.ConnectionTimeoutError: ConnectTimeout,  # sock_connect
    TimeoutError: ReadTimeout,  # sock_read while waiting for headers
    aiohttp.ClientConnectorError: ConnectError,
    (aiohttp.ClientError, ConnectionError): ReadReset,
}
_IN_BODY: ExceptionMapping = {
    TimeoutError: ReadTimeout,
    (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionError): ReadReset,
}


class AiohttpResponse:
    """One open upstream response. Read with `read_chunk` until b""; then `release` or `abort`."""

    __slots__ = ("_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def read_chunk(self) -> bytes:
        """Whatever bytes have arrived (at least one), or b"" at the end of the body."""
        with map_exceptions(_IN_BODY, "upstream connection failed mid-body"):
            return await self._resp.content.readany()

    async def read_all(self, limit: int) -> bytes:
        """The whole body, refusing more than `limit` bytes (a bounded buffer for non-streaming)."""
        return await read_body(self, limit)

    def release(self) -> None:
        """Body fully read: give the connection back to the pool."""
        self._resp.release()

    def abort(self) -> None:
        """Close the connection now so the provider sees the disconnect and stops generating."""
        self._resp.close()


class AiohttpUpstream:
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
    ) -> AiohttpResponse:
        """POST `body` and wait for the response status and headers.

        `read_timeout` bounds every silence on the socket (headers and body): the idle timeout."""
        session = self._get_session()
        with map_exceptions(_BEFORE_HEADERS, "upstream failed before headers"):
            resp = await session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=connect_timeout, sock_read=read_timeout
                ),
                allow_redirects=False,
            )
        return AiohttpResponse(resp)

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
