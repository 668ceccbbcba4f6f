"""hedge/body.py without sockets: bounded decoding, exact media type, the JSON shape bound (issue 13)."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import orjson
import pytest

from hedge.body import (
    BodyDecoder,
    check_content_type,
    check_declared_length,
    check_encoding,
    check_shape,
    read_body,
)
from hedge.errors import ApiError
from hedge.request import parse_chat_request

BODY = orjson.dumps({"model": "m/a", "messages": [{"role": "user", "content": "hi " * 1000}]})


def feed_all(dec: BodyDecoder, data: bytes, step: int = 977) -> bytearray:
    for i in range(0, len(data), step):
        dec.feed(data[i : i + step])
    return dec.finish()


@pytest.mark.parametrize(
    "enc,data",
    [
        ("identity", BODY),
        ("gzip", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),  # RFC 9110 deflate: zlib-wrapped
        ("deflate", zlib.compress(BODY)[2:-4]),  # what some clients send: raw deflate
        ("gzip", gzip.compress(BODY[:100]) + gzip.compress(BODY[100:])),  # two gzip members
    ],
)
def test_decodes_in_pieces(enc: str, data: bytes) -> None:
    assert bytes(feed_all(BodyDecoder(enc, 1 << 20), data)) == BODY


def test_a_bomb_stops_at_the_limit_without_inflating_it() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20), 9)  # 64 MiB of zeros in ~64 KB
    dec = BodyDecoder("gzip", 1 << 20)
    with pytest.raises(ApiError) as e:
        feed_all(dec, bomb, step=len(bomb))  # one feed: a single decompress call must still stop
    assert e.value.status == 413
    assert len(dec.out) <= 1 << 20


@pytest.mark.parametrize(
    "enc,data",
    [
        ("gzip", BODY),  # not compressed at all
        ("deflate", b"\xff" + BODY),
        ("gzip", gzip.compress(BODY)[:-10]),  # cut inside the stream
        ("gzip", gzip.compress(BODY) + b"junk"),
        ("gzip", b""),
    ],
)
def test_broken_compression_is_a_400(enc: str, data: bytes) -> None:
    with pytest.raises(ApiError) as e:
        feed_all(BodyDecoder(enc, 1 << 20), data)
    assert (e.value.status, e.value.code) == (400, "bad_compression")


def test_identity_over_the_limit() -> None:
    with pytest.raises(ApiError) as e:
        feed_all(BodyDecoder("identity", 100), b"x" * 101)
    assert e.value.status == 413


@pytest.mark.parametrize("value", ["br", "gzip, gzip", "compress", "", "zstd"])
def test_unknown_encodings_are_415(value: str) -> None:
    with pytest.raises(ApiError) as e:
        check_encoding(value)
    assert (e.value.status, e.value.code) == (415, "unsupported_encoding")


def test_known_encodings() -> None:
    assert [check_encoding(v) for v in (None, "identity", " GZIP ", "x-gzip", "deflate")] == [
        "identity", "identity", "gzip", "gzip", "deflate",
    ]  # fmt: skip


@pytest.mark.parametrize("value", [None, "application/json", "Application/JSON; charset=utf-8"])
def test_content_type_accepted(value: str | None) -> None:
    check_content_type(value)


@pytest.mark.parametrize(
    "value", ["text/json", "application/jsonx", "application/x-ndjson", "text/plain; a=json", "json", ""]
)
def test_content_type_is_matched_exactly(value: str) -> None:
    with pytest.raises(ApiError) as e:
        check_content_type(value)
    assert e.value.status == 415


def test_declared_length() -> None:
    check_declared_length({"Content-Length": "100"}, 100)
    check_declared_length({}, 100)
    with pytest.raises(ApiError) as e:
        check_declared_length({"Content-Length": "101"}, 100)
    assert e.value.status == 413


def test_shape_bound_refuses_many_tiny_values_before_parsing() -> None:
    tiny = b'{"model":"m","messages":[' + b",".join([b'{"role":"u"}'] * 10_000) + b"]}"
    with pytest.raises(ApiError) as e:
        check_shape(tiny, 5_000)
    assert (e.value.status, e.value.code) == (400, "request_too_complex")
    check_shape(BODY, 5_000)  # a normal prompt is far under it


def test_shape_bound_is_an_upper_bound_on_parsed_values() -> None:
    """Whatever the JSON, commas + '{' + '[' + 1 is at least the number of values orjson builds."""

    def values(v: object) -> int:
        if isinstance(v, dict):
            return 1 + sum(values(x) for x in v.values())
        if isinstance(v, list):
            return 1 + sum(values(x) for x in v)
        return 1

    for doc in [[], {}, [[]], [1, 2, [3, {"a": [], "b": {}}]], {"a": "x,y{", "b": [1, {}]}, [[[[1]]], 2]]:
        raw = orjson.dumps(doc)
        bound = raw.count(b",") + raw.count(b"{") + raw.count(b"[") + 1
        assert bound >= values(doc), (raw, bound)


def test_message_count_bound() -> None:
    raw = orjson.dumps({"model": "m", "messages": [{"role": "u"}] * 11})
    parse_chat_request(raw, max_messages=11)
    with pytest.raises(ApiError) as e:
        parse_chat_request(raw, max_messages=10)
    assert (e.value.status, e.value.code, e.value.param) == (400, "too_many_messages", "messages")


class Trickle:
    """A body stream that sends a few bytes and then stalls."""

    def __init__(self, parts: list[bytes], stall: bool) -> None:
        self.parts = parts
        self.stall = stall

    async def readany(self) -> bytes:
        if self.parts:
            return self.parts.pop(0)
        if self.stall:
            await asyncio.sleep(3600)
        return b""


async def test_read_body_times_out_with_a_408() -> None:
    with pytest.raises(ApiError) as e:
        await read_body(Trickle([b"{"], stall=True), BodyDecoder("identity", 100), 0.05)
    assert (e.value.status, e.value.code) == (408, "body_timeout")


async def test_read_body_reads_to_the_end() -> None:
    out = await read_body(Trickle([b"ab", b"cd"], stall=False), BodyDecoder("identity", 100), 5)
    assert out == b"abcd"


def test_pump_decodes_a_slice_at_a_time() -> None:
    dec = BodyDecoder("gzip", 8 << 20)
    dec.put(gzip.compress(b"x" * (4 << 20)))
    slices = 0
    while dec.pump(1 << 20):
        slices += 1
        assert len(dec.out) <= slices * (1 << 20)
    assert slices >= 3 and bytes(dec.finish()) == b"x" * (4 << 20)


def test_the_shape_bound_stops_the_decoder_early() -> None:
    tiny = b'{"model":"m","messages":[' + b",".join([b'{"role":"u"}'] * 200_000) + b"]}"
    dec = BodyDecoder("gzip", 32 << 20, max_items=10_000)
    dec.put(gzip.compress(tiny))
    with pytest.raises(ApiError) as e:
        while dec.pump(64 << 10):
            pass
    assert e.value.code == "request_too_complex"
    assert len(dec.out) < len(tiny) // 4  # refused long before the whole body was inflated
