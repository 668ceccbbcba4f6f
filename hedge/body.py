"""Reading a request body a caller controls: framing, decompression and shape, all bounded (issue 13).

Everything here but `read_body` is sans-IO: plain functions and a `BodyDecoder` fed bytes. The rules:

* A declared `Content-Length` over the limit is refused before a byte of the body is read (413).
* The media type must be exactly `application/json` (parameters such as `charset` allowed); a missing
  Content-Type is taken as JSON, as the OpenAI SDKs always send it and curl users often forget it.
* `Content-Encoding` is one of identity, gzip, deflate (else 415). Decompression streams through
  `zlib.decompressobj(...).decompress(data, max_length)`, so no call ever inflates more than the room
  left under `max_body_bytes`: a 1 MB gzip of 1 GB of zeros costs at most `max_body_bytes` and stops
  there with a 413. Broken compression is a 400, never a 500.
* The shape of the JSON is bounded before it is parsed. `orjson.loads` of 26 MB of `{"role":"u"},`
  builds 2,000,000 dicts (~700 MB); the parse costs up to ~250 bytes per JSON value, and a value can take
  as little as 2 bytes of input. Every value but the last in an array or object is followed by a comma,
  so `commas + '{' + '[' + 1` bounds the number of values from above. Counting three bytes is a memchr
  pass (a few ms for 32 MB) and counts them inside strings too, which only makes it an upper bound: a
  legitimate prompt has about one comma per hundred characters of prose. `BodyDecoder` counts as the
  decoded bytes arrive, so such a body is refused once the bound is passed, not after all of it is in.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Mapping
from typing import Protocol

from .errors import ApiError

ENCODINGS = ("identity", "gzip", "x-gzip", "deflate")
PUMP_BYTES = 1 << 20  # decoded bytes per slice between yields to the event loop (BodyDecoder.pump)


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than this gateway accepts ({limit} bytes, after decompression).",
        code="request_too_large",
    )


def check_content_type(value: str | None) -> None:
    """Exactly application/json, with optional parameters; not any type that merely contains "json"."""
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(
            415, f"Content-Type must be application/json, got {value[:100]!r}.", code="unsupported_media_type"
        )


def check_encoding(value: str | None) -> str:
    """The one content coding of the body, normalised; 415 for anything we cannot undo."""
    if value is None:
        return "identity"
    enc = value.strip().lower()
    if enc == "x-gzip":
        enc = "gzip"
    if enc not in ENCODINGS or enc == "":
        raise ApiError(
            415,
            f"Content-Encoding {value[:50]!r} is not supported (use gzip, deflate or none).",
            code="unsupported_encoding",
        )
    return enc


def check_declared_length(headers: Mapping[str, str], limit: int) -> None:
    """413 before reading when the declared length alone is over the limit (identity bodies only: a
    compressed body may be small and inflate past it, which the decoder catches as it streams)."""
    v = headers.get("Content-Length")
    if v is None:
        return
    try:
        n = int(v)
    except ValueError:
        return  # aiohttp's parser refuses a malformed Content-Length before we are called
    if n > limit:
        raise too_large(limit)


def count_items(data: bytes | bytearray) -> int:
    """An upper bound on the JSON values starting in `data` (see the module docstring)."""
    return data.count(b",") + data.count(b"{") + data.count(b"[")


def too_complex(max_items: int) -> ApiError:
    return ApiError(
        400,
        f"The request body holds too many JSON values (this gateway accepts {max_items}).",
        code="request_too_complex",
    )


def check_shape(raw: bytes | bytearray, max_items: int) -> None:
    """Refuse a body whose parse could cost far more than its size (see the module docstring)."""
    if count_items(raw) + 1 > max_items:
        raise too_complex(max_items)


def _bad_compression(enc: str) -> ApiError:
    return ApiError(
        400, f"The request body is not valid {enc} data (Content-Encoding: {enc}).", code="bad_compression"
    )


class BodyDecoder:
    """Feed the body as it arrives; collects at most `limit` bytes of decoded output.

    Decoded bytes go into one bytearray (no second copy: orjson parses a bytearray as it is)."""

    def __init__(self, encoding: str, limit: int, max_items: int | None = None) -> None:
        self.encoding = encoding
        self.limit = limit
        self.max_items = max_items  # the shape bound, counted as the body arrives: stop early
        self.items = 1
        self.out = bytearray()
        self._z: zlib._Decompress | None = None
        self._seen = b""  # deflate: the first bytes, to tell zlib-wrapped from raw deflate
        self._ended = False  # the compressed stream reached its end marker
        self._pending = b""  # compressed input not yet decoded (see `pump`)
        if encoding == "gzip":
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> None:
        """Take `data` and decode all of it now."""
        self.put(data)
        while self.pump():
            pass

    def put(self, data: bytes) -> None:
        """Take `data`; compressed input is decoded by `pump`, a slice at a time."""
        if not data:
            return
        if self.encoding == "identity":
            if len(self.out) + len(data) > self.limit:
                raise too_large(self.limit)
            self._append(data)
            return
        if self._z is None:  # deflate: RFC 9110 says zlib-wrapped; some clients send raw deflate
            self._seen += data
            if len(self._seen) < 2:
                return
            data, self._seen = self._seen, b""
            zlib_wrapped = (data[0] & 0x0F) == 8 and ((data[0] << 8) | data[1]) % 31 == 0
            self._z = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
        self._pending = self._pending + data if self._pending else data

    def pump(self, budget: int = PUMP_BYTES) -> bool:
        """Decode pending input into at most about `budget` bytes of output; True if input is left.

        A small gzip can hold megabytes of output per kilobyte: the slices let the caller yield to the
        event loop between them, so inflating up to the limit never stalls other requests for long."""
        z = self._z
        data = self._pending
        made = 0
        while data and made < budget:
            assert z is not None
            if self._ended:
                # gzip allows several members one after another; anything else after the end is junk
                if self.encoding == "gzip" and data[:2] == b"\x1f\x8b":
                    z = self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self._ended = False
                elif data.strip(b"\x00"):
                    raise _bad_compression(self.encoding)
                else:
                    data = b""
                    break
            room = self.limit - len(self.out)
            try:
                # never more than one byte past the limit, nor much past the budget
                chunk = z.decompress(data, min(room + 1, budget - made))
            except zlib.error:
                raise _bad_compression(self.encoding) from None
            if len(chunk) > room:
                raise too_large(self.limit)
            self._append(chunk)
            made += len(chunk)
            if z.eof:
                self._ended = True
                data = z.unused_data
            else:
                data = z.unconsumed_tail
        self._pending = data
        return bool(data)

    def _append(self, chunk: bytes) -> None:
        if self.max_items is not None:
            self.items += count_items(chunk)
            if self.items > self.max_items:
                raise too_complex(self.max_items)
        self.out += chunk

    def finish(self) -> bytearray:
        """The decoded body; 400 if a compressed body stopped before its end marker."""
        if self.encoding != "identity":
            if self._seen or (self._z is not None and not self._ended):
                raise _bad_compression(self.encoding)
        return self.out


class ByteStream(Protocol):
    async def readany(self) -> bytes: ...


async def read_body(stream: ByteStream, decoder: BodyDecoder, seconds: float) -> bytearray:
    """Read the whole body within `seconds` (408 after that), decoding as it arrives."""
    try:
        async with asyncio.timeout(seconds):
            while chunk := await stream.readany():
                decoder.put(chunk)
                while decoder.pump():  # noqa: ASYNC110 (a yield, not a wait)
                    await asyncio.sleep(0)  # a slice of output at a time: other requests run between
    except TimeoutError:
        raise ApiError(
            408, f"The request body did not arrive within {seconds:g} s.", code="body_timeout"
        ) from None
    return decoder.finish()
