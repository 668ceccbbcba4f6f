"""The sans-IO pieces of the lean upstream client, without sockets: the HTTP/1.1 response parser
(`hedge/http11.py`), gzip/deflate decoding (`hedge/decoding.py`) and read backpressure
(`fastclient.FlowControl`).

The parser is fed bytes by hand. Its contract: whatever way a response's bytes are cut into reads, the
events are the same (once adjacent `Data` events are joined), and anything malformed is a
`ProtocolError`. Socket-level behaviour (keep-alive, timeouts, aborts) is tested in test_fastclient.py.
"""

from __future__ import annotations

import gzip
import itertools
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hedge.decoding import BodyDecoder
from hedge.fastclient import FlowControl
from hedge.http11 import (
    FRAMING_PER_PIECE,
    MAX_HEAD,
    Data,
    EndOfMessage,
    Event,
    Headers,
    Response,
    ResponseParser,
)
from hedge.upstream_errors import ProtocolError, ReadReset

BODY = b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\ndata: [DONE]\n\n'
HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


def chunked(parts: list[bytes], *, ext: bool = False, trailers: bool = False) -> bytes:
    out = HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n"
    for i, p in enumerate(parts):
        out += b"%x%s\r\n%s\r\n" % (len(p), b";n=%d" % i if ext else b"", p)
    out += b"0\r\n" + (b"X-Checksum: abc\r\n" if trailers else b"") + b"\r\n"
    return out


LENGTH = HEAD_OK + b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
INTERIM = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
# (name, raw bytes, ends with the peer's close); each parses to expected(name)
CASES: list[tuple[str, bytes, bool]] = [
    ("length", LENGTH, False),
    ("chunked", chunked([BODY[:10], BODY[10:11], BODY[11:]]), False),
    ("chunked-ext-trailers", chunked([BODY[:30], BODY[30:]], ext=True, trailers=True), False),
    ("interim-1xx", INTERIM + LENGTH, False),
    ("close-delimited", b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + BODY, True),
]


def expected(name: str) -> list[Event]:
    h = Headers({"content-type": "text/event-stream"})
    if name in ("length", "interim-1xx"):
        h["content-length"] = str(len(BODY))
    elif name.startswith("chunked"):
        h["transfer-encoding"] = "chunked"
    return [Response(200, h), Data(BODY), EndOfMessage()]


def joined(events: list[Event]) -> list[Event]:
    """Adjacent Data events merged: how the body was cut into reads is not part of the contract."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def parse(pieces: list[bytes], closes: bool, parser: ResponseParser | None = None) -> list[Event]:
    p = parser or ResponseParser()
    events: list[Event] = []
    for piece in pieces:
        events += p.feed(piece)
    if closes:
        events += p.feed_eof()
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# -------------------------------------------------------------------------------------- events


@pytest.mark.parametrize("name,raw,closes", CASES, ids=[c[0] for c in CASES])
def test_whole_response_gives_head_body_end(name: str, raw: bytes, closes: bool) -> None:
    p = ResponseParser()
    assert joined(parse([raw], closes, p)) == expected(name)
    assert p.done
    assert p.keep_alive is not closes


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0, max_value=1024), max_size=30))
def test_any_split_gives_the_same_events(case: tuple[str, bytes, bool], cuts: list[int]) -> None:
    name, raw, closes = case
    assert joined(parse(split_at(raw, cuts), closes)) == expected(name)


@pytest.mark.parametrize("name,raw,closes", CASES, ids=[c[0] for c in CASES])
def test_one_byte_at_a_time(name: str, raw: bytes, closes: bool) -> None:
    events = parse([raw[i : i + 1] for i in range(len(raw))], closes)
    assert joined(events) == expected(name)
    assert sum(isinstance(e, Response) for e in events) == 1  # interim heads are never reported


def test_headers_lower_cased_stripped_and_folded() -> None:
    raw = b"HTTP/1.1 200 OK\r\nVia: 1.1 a  \r\nVIA:1.1 b\r\nX-Request-ID: abc\r\nContent-Length: 0\r\n\r\n"
    [head, end] = ResponseParser().feed(raw)
    assert isinstance(head, Response) and isinstance(end, EndOfMessage)
    assert dict(head.headers) == {"via": "1.1 a, 1.1 b", "x-request-id": "abc", "content-length": "0"}
    assert head.headers["X-Request-Id"] == "abc" and "CONTENT-LENGTH" in head.headers


def test_trailers_are_consumed_not_surfaced() -> None:
    [head, *_] = parse([chunked([BODY], trailers=True)], False)
    assert isinstance(head, Response) and "x-checksum" not in head.headers


def test_no_body_statuses_end_at_the_head() -> None:
    p = ResponseParser()
    events = p.feed(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
    assert events == [Response(204, Headers({"x-a": "1"})), EndOfMessage()]
    assert p.keep_alive


def test_connection_close_and_http10_are_not_kept_alive() -> None:
    p = ResponseParser()
    parse([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"], False, p)
    assert p.done and not p.keep_alive
    p = ResponseParser()
    parse([b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi"], False, p)
    assert p.done and not p.keep_alive


def test_close_delimited_body_needs_the_close() -> None:
    p = ResponseParser()
    events = p.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial")
    assert joined(events)[1:] == [Data(b"partial")]  # no end yet: only the close says
    assert not p.done
    assert p.feed_eof() == [EndOfMessage()]
    assert p.done and not p.keep_alive


@pytest.mark.parametrize(
    "raw",
    [b"", b"HTTP/1.1 200 OK\r\nContent-", LENGTH[:-3], chunked([BODY])[:-5]],
    ids=["nothing", "mid-head", "short-length", "mid-chunked"],
)
def test_close_before_the_end_is_a_reset(raw: bytes) -> None:
    p = ResponseParser()
    p.feed(raw)
    with pytest.raises(ReadReset):
        p.feed_eof()


@pytest.mark.parametrize("same_read", [True, False])
def test_bytes_after_the_response_spoil_keep_alive_not_the_body(same_read: bool) -> None:
    extra = b"HTTP/1.1 200 OK\r\n"
    p = ResponseParser()
    pieces = [LENGTH + extra] if same_read else [LENGTH, extra]
    assert joined(parse(pieces, False, p)) == expected("length")
    assert p.done and not p.keep_alive


def test_reset_reads_the_next_response_on_a_kept_alive_connection() -> None:
    p = ResponseParser()
    for _ in range(3):
        assert joined(parse([LENGTH], False, p)) == expected("length")
        assert p.keep_alive
        p.reset()


# ----------------------------------------------------------------------------------- malformed


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
MALFORMED = {
    "garbage-status-line": b"FOO 200 OK\r\n\r\n",
    "non-numeric-status": b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
    "not-http-at-all": b"<html>hello</html>\r\n\r\n",
    "bad-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n",
    "negative-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
    "bad-chunk-size": CHUNKED_HEAD + b"zz\r\nhello\r\n0\r\n\r\n",
    "negative-chunk-size": CHUNKED_HEAD + b"-5\r\nhello\r\n0\r\n\r\n",
    # Python's int(x, 16) takes these; HTTP's chunk-size is plain hex digits only (RFC 9112 7.1)
    "0x-prefixed-chunk-size": CHUNKED_HEAD + b"0x5\r\nhello\r\n0\r\n\r\n",
    "plus-signed-chunk-size": CHUNKED_HEAD + b"+5\r\nhello\r\n0\r\n\r\n",
    "underscored-chunk-size": CHUNKED_HEAD + b"0_5\r\nhello\r\n0\r\n\r\n",
    "chunk-longer-than-declared": CHUNKED_HEAD + b"5\r\nhello!!\r\n0\r\n\r\n",  # no CRLF after data
    # stricter than the hand-written parser was (both are request-smuggling vectors, RFC 9112 6.1/2.2)
    "length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    "bare-lf-line-ends": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_is_a_protocol_error_however_it_is_cut(raw: bytes) -> None:
    for pieces in ([raw], [raw[i : i + 1] for i in range(len(raw))]):
        with pytest.raises(ProtocolError):
            parse(pieces, False)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (MAX_HEAD + 10),  # an endless header line
        CHUNKED_HEAD + b"0" * (MAX_HEAD + 10),  # an endless chunk-size line
        CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n" + b"X-T: x\r\n" * (MAX_HEAD // 8 + FRAMING_PER_PIECE),
    ],
    ids=["head", "chunk-size-line", "trailers"],
)
@pytest.mark.parametrize("piece", [4096, 1 << 20])
def test_endless_framing_is_refused(raw: bytes, piece: int) -> None:
    # llhttp streams without buffering, so none of these costs memory; they would hold the connection
    # forever without ever going silent. The parser counts framing bytes and stops them.
    with pytest.raises(ProtocolError, match="too large"):
        parse([raw[i : i + piece] for i in range(0, len(raw), piece)], False)


def test_many_tiny_chunks_in_one_read_are_not_mistaken_for_endless_framing() -> None:
    parts = [b"x"] * 50_000  # 5 framing bytes per body byte, 250 KB of framing in one read
    events = parse([chunked(parts)], False)
    assert joined(events)[1:] == [Data(b"x" * 50_000), EndOfMessage()]


# ------------------------------------------------------------------------------------ decoding


def deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


ENCODED = {
    "gzip": gzip.compress(BODY * 10, mtime=0),
    "x-gzip": gzip.compress(BODY * 10, mtime=0),
    "deflate": zlib.compress(BODY * 10),  # zlib-wrapped, as RFC 9110 says
    "Deflate ": deflate_raw(BODY * 10),  # raw deflate, as some servers send
}


@settings(max_examples=100, deadline=None)
@given(enc=st.sampled_from(sorted(ENCODED)), cuts=st.lists(st.integers(0, 2048), max_size=12))
def test_decoder_any_split(enc: str, cuts: list[int]) -> None:
    d = BodyDecoder.for_encoding(enc)
    assert d is not None
    out = b"".join(d.decode(p) for p in split_at(ENCODED[enc], cuts)) + d.finish()
    assert out == BODY * 10


def test_identity_needs_no_decoder() -> None:
    assert BodyDecoder.for_encoding("identity") is None
    assert BodyDecoder.for_encoding("") is None


def test_truncated_or_garbage_compressed_body_is_a_protocol_error() -> None:
    d = BodyDecoder.for_encoding("gzip")
    assert d is not None
    d.decode(ENCODED["gzip"][:-12])
    with pytest.raises(ProtocolError, match="inside its compressed stream"):
        d.finish()
    d = BodyDecoder.for_encoding("gzip")
    assert d is not None
    with pytest.raises(ProtocolError):
        d.decode(b"not gzip!")


# ---------------------------------------------------------------------------------- backpressure


class FakeTransport:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


def test_flow_control_pauses_once_above_high_water_and_resumes_once_drained() -> None:
    t = FakeTransport()
    f = FlowControl(t, high_water=100)  # type: ignore[arg-type]
    f.queued(100)
    assert not f.paused and t.calls == []
    f.queued(101)
    f.queued(500)
    assert f.paused and t.calls == ["pause"]
    assert f.drained()
    assert not f.drained()  # resumed already: nothing to do
    assert t.calls == ["pause", "resume"]


def test_flow_control_before_the_transport_exists_does_nothing() -> None:
    f = FlowControl(high_water=1)
    f.queued(10)
    assert not f.paused and not f.drained()


@pytest.mark.parametrize("first", [b"garbage\r\n\r\n", LENGTH[:-5], LENGTH + b"HTTP/1.1 2"])
def test_reset_after_a_broken_or_unfinished_response_starts_afresh(first: bytes) -> None:
    p = ResponseParser()
    try:
        p.feed(first)
    except ProtocolError:
        pass
    p.reset()
    assert joined(parse([LENGTH], False, p)) == expected("length")


def test_the_body_pieces_of_one_read_are_one_data_event() -> None:
    # a read holding a whole streamed response (two dozen chunks) costs one event, not two dozen
    parts = [b"data: %d\n\n" % i for i in range(24)]
    raw = chunked(parts)
    head_end = raw.index(b"\r\n\r\n") + 4
    p = ResponseParser()
    assert len(p.feed(raw[:head_end])) == 1
    assert p.feed(raw[head_end:]) == [Data(b"".join(parts)), EndOfMessage()]
