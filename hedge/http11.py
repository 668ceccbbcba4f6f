"""A sans-IO HTTP/1.1 *response* parser with an h11-like interface, on llhttp (docs/design.md).

`ResponseParser.feed(bytes)` returns the events those bytes complete: one `Response` (status, headers)
per response, `Data` for body bytes as they come, `EndOfMessage` when the body is complete;
`feed_eof()` says the peer closed. No loop, no transport, no timers: the lean client wires it to a
socket, and the unit tests feed it bytes by hand.

The parsing itself is httptools' `HttpResponseParser` (llhttp, C, the parser uvicorn and Node use):
profiling put the hand-written Python parser at 18 % of the fast lane's CPU. This module only adds what
a client on one connection needs on top of it:

- interim 1xx responses are skipped (their headers too); the final response is the `Response` event;
- the body pieces one `feed` completes come out as one `Data` event (chunk boundaries carry no meaning);
- header names are lower-cased, values stripped, repeated headers folded with ", " (RFC 9110 5.3);
  trailers after a chunked body are consumed, not surfaced;
- a body delimited by the connection's close ends at `feed_eof()` (llhttp cannot know);
- bytes after the end of the response are not parsed as another one: they only make the connection
  not reusable (`keep_alive` false), since no request of ours asked for them;
- framing bytes are bounded: llhttp streams and buffers nothing, so an endless head or chunk-size line
  costs no memory, but it would hold the connection forever without ever being silent. At most
  `MAX_HEAD` bytes of head, plus 1 KiB of framing per body piece, may come before a response is done.

Anything malformed raises `ProtocolError`; after that the parser is dead, as is the connection.
"""

from __future__ import annotations

import httptools

from .upstream_errors import ProtocolError, ReadReset

MAX_HEAD = 64 * 1024
FRAMING_PER_PIECE = 1024  # size line, extensions and CRLFs allowed per body piece (a chunk header is ~10)


class Headers(dict[str, str]):
    """Response headers: a dict with lower-case keys, looked up case-insensitively."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, key.lower())


class Response:
    """The final response's status line and headers (interim 1xx responses are not reported)."""

    __slots__ = ("headers", "status")

    def __init__(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Response) and (self.status, self.headers) == (other.status, other.headers)

    def __repr__(self) -> str:
        return f"Response({self.status}, {dict(self.headers)!r})"


class Data:
    """Body bytes, raw (still content-encoded), in the order they came."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Data) and self.data == other.data

    def __repr__(self) -> str:
        return f"Data({self.data!r})"


class EndOfMessage:
    """The body is complete. `ResponseParser.keep_alive` says whether the connection may be reused."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EndOfMessage)

    def __repr__(self) -> str:
        return "EndOfMessage()"


Event = Response | Data | EndOfMessage
END = EndOfMessage()


class _Trailing(Exception):
    """Raised inside a callback to stop llhttp at bytes that follow the complete response."""


class ResponseParser:
    """Parses one connection's responses to our requests; `reset()` before reading the next one."""

    __slots__ = (
        "_body",
        "_credit",
        "_events",
        "_fed",
        "_final",
        "_headers",
        "_parser",
        "_seen",
        "_until_eof",
        "done",
        "keep_alive",
    )  # fmt: skip

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []  # body pieces of the current feed, one Data event at its end
        self._fed = False  # bytes went into the llhttp parser since it was made or last reused
        self.done = False  # EndOfMessage was emitted
        self.keep_alive = True  # after EndOfMessage: the connection may carry another request
        self._start()

    def reset(self) -> None:
        """Ready for the next response on the same connection. After a complete keep-alive response
        llhttp is at a message boundary and is reused; after anything else it starts afresh."""
        if self._fed and not (self.done and self.keep_alive):
            self._parser = httptools.HttpResponseParser(self)
        self._fed = False
        self._start()

    def _start(self) -> None:
        self._events: list[Event] = []
        self._headers = Headers()
        self._final = False  # the head being parsed (or parsed) is the final, non-1xx one
        self._until_eof = False  # the body runs until the connection closes
        self._seen = 0  # bytes fed for this response
        self._credit = 0  # body bytes delivered + FRAMING_PER_PIECE per body piece
        self.done = False
        self.keep_alive = True

    # --------------------------------------------------------------------------------- interface

    def feed(self, data: bytes) -> list[Event]:
        """The events `data` completes. Raises `ProtocolError` on a malformed response."""
        events: list[Event] = []
        if self.done or not data:
            if data:
                self.keep_alive = False  # bytes nobody asked for: do not reuse the connection
            return events
        self._events = events
        self._fed = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if not isinstance(e.__context__, _Trailing):
                self._body.clear()
                raise ProtocolError("upstream sent a malformed HTTP response") from None
        except httptools.HttpParserError:
            self._body.clear()
            raise ProtocolError("upstream sent a malformed HTTP response") from None
        body = self._body
        if body:  # what on_message_complete has not flushed (inlined: this is the per-read path)
            events.append(Data(body[0] if len(body) == 1 else b"".join(body)))
            body.clear()
        if not self.done:
            self._seen += len(data)
            if self._seen - self._credit > MAX_HEAD:
                what = "chunk framing" if self._final else "response head"
                raise ProtocolError(f"upstream {what} too large")
        return events

    def feed_eof(self) -> list[Event]:
        """The peer closed its side cleanly. Ends a close-delimited body; anything else unfinished is
        a `ReadReset`."""
        if self.done:
            return []
        if self._until_eof:
            self.done = True
            self.keep_alive = False
            return [END]
        raise ReadReset("upstream closed the connection mid-response")

    # ------------------------------------------------------------------ llhttp callbacks (private)

    def on_message_begin(self) -> None:
        if self.done:  # bytes after our response, in the same read: stop llhttp there
            self.keep_alive = False
            raise _Trailing

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._final:
            return  # a trailer after a chunked body: consumed, not surfaced
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1").strip()
        h = self._headers
        old = dict.get(h, key)
        h[key] = val if old is None else f"{old}, {val}"

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # interim (100 Continue, 103 Early Hints): the real head follows
            self._headers = Headers()
            return
        self._final = True
        h = self._headers
        te = dict.get(h, "transfer-encoding")
        self._until_eof = not (
            status in (204, 304) or "content-length" in h or (te is not None and "chunked" in te.lower())
        )  # RFC 9112 6.3: neither length nor chunked, so only the close ends the body (llhttp agrees)
        self._events.append(Response(status, h))

    def on_body(self, body: bytes) -> None:
        self._credit += len(body) + FRAMING_PER_PIECE
        self._body.append(body)

    def on_message_complete(self) -> None:
        if not self._final:
            return  # the end of an interim response
        self.keep_alive = self._parser.should_keep_alive()
        self.done = True
        if self._body:
            self._flush()
        self._events.append(END)

    def _flush(self) -> None:
        """One Data event for the body pieces of this feed: a read holding a whole streamed response
        (two dozen chunks) becomes one event, and the reader gets one string instead of a list."""
        b = self._body
        self._events.append(Data(b[0] if len(b) == 1 else b"".join(b)))
        b.clear()
