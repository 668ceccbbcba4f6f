"""Typed upstream failures, mapped once at the edge of each client (docs/design.md, "Upstream client").

Modelled on httpcore's `_exceptions.py`: a small hierarchy the rest of the proxy matches with
`isinstance`, and `map_exceptions`, the one place where a library's or the OS's exceptions become ours.
Nothing here imports aiohttp, so the lean client and the sans-IO core can use it.

Each class carries `reason`, the label the failure gets in metrics, in the race's `Failure` and in
error texts. The values are the ones dashboards already use (connect | timeout | reset | too_large), so
two classes may share one: a malformed response is labelled "reset" like a broken connection, because
to the race both mean "this provider's connection failed; fail over".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import ClassVar


class UpstreamError(Exception):
    """A transport-level failure talking to a provider. Subclasses say which; `reason` labels it."""

    reason: ClassVar[str] = "reset"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)


class ConnectError(UpstreamError):
    """No connection: refused, unreachable, DNS, TLS handshake."""

    reason = "connect"


class UpstreamTimeout(UpstreamError):
    """The provider was silent for longer than a timeout allows (connect, or the idle read timeout)."""

    reason = "timeout"


class ConnectTimeout(UpstreamTimeout):
    """The connection was not made within the connect timeout."""


class ReadTimeout(UpstreamTimeout):
    """The socket was silent for longer than the idle read timeout (before or after the headers)."""


class ReadReset(UpstreamError):
    """The connection broke or was closed before the response was complete."""

    reason = "reset"


class ProtocolError(UpstreamError):
    """The provider's bytes are not a valid HTTP/1.1 response (or its body not valid gzip/deflate).
    Labelled "reset" as before typed errors existed: the connection is unusable either way."""

    reason = "reset"


class TooLarge(UpstreamError):
    """A response body read whole (non-streaming) was larger than the limit allowed."""

    reason = "too_large"


ExceptionMapping = Mapping[type[BaseException] | tuple[type[BaseException], ...], type[UpstreamError]]


@contextlib.contextmanager
def map_exceptions(mapping: ExceptionMapping, what: str) -> Iterator[None]:
    """Turn foreign exceptions into typed upstream errors; the first matching entry wins, so list
    subclasses before their bases. The text says `what` failed and names the exception's type only:
    a library's message may quote a URL or a header, and provider keys must never reach a log."""
    try:
        yield
    except UpstreamError:
        raise
    except Exception as exc:
        for source, target in mapping.items():
            if isinstance(exc, source):
                raise target(f"{what} ({type(exc).__name__})") from None
        raise
