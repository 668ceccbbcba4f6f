"""Content-Encoding decoding for the lean client's response bodies (docs/design.md, "Upstream client").

We ask providers for `Accept-Encoding: identity`, but some compress anyway. `BodyDecoder` turns gzip
or deflate body bytes back into what the provider meant, piece by piece as they arrive, and refuses a
body whose compressed stream is cut short: a truncated answer must never pass as a whole one.
"""

from __future__ import annotations

import zlib

from .upstream_errors import ProtocolError


class BodyDecoder:
    """Incremental gzip / deflate decoding. `decode` each piece; `finish` once the body has ended."""

    __slots__ = ("_probe", "_z")

    def __init__(self, encoding: str) -> None:
        if encoding == "deflate":
            self._z = zlib.decompressobj()
            self._probe = True  # zlib-wrapped (RFC 9110) or raw deflate? decided by the first byte
        else:
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self._probe = False

    @staticmethod
    def for_encoding(content_encoding: str) -> BodyDecoder | None:
        """A decoder for a Content-Encoding header's value, or None when it needs none."""
        enc = content_encoding.strip().lower()
        if enc in ("gzip", "x-gzip"):
            return BodyDecoder("gzip")
        if enc == "deflate":
            return BodyDecoder("deflate")
        return None

    def decode(self, raw: bytes) -> bytes:
        if not raw:
            return b""
        if self._probe:
            self._probe = False
            if raw[0] & 0x0F != 8:  # not a zlib header (CM=8): raw deflate, as some servers send
                self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            return self._z.decompress(raw)
        except zlib.error:
            raise ProtocolError("upstream body is not valid gzip/deflate") from None

    def finish(self) -> bytes:
        """The decoder's tail. Raises if the compressed stream is incomplete: the framing said the
        body ended (a length reached, or a clean close) but the stream did not."""
        try:
            tail = self._z.flush()
        except zlib.error:
            raise ProtocolError("upstream body is not valid gzip/deflate") from None
        if not self._z.eof:
            raise ProtocolError("upstream body ended inside its compressed stream")
        return tail
