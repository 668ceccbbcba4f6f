"""Incremental SSE parsing, only as far as the first token: the chat completions entry point.

The proxy must know *when* an attempt has produced its first real token, but it must not pay for parsing
the rest of the stream: once an attempt wins, its bytes are forwarded untouched. The framing and the
per-API rules live in `dialects` (docs/design.md, "API dialects"); this module keeps the chat names the
proxy and the tests use.
"""

from __future__ import annotations

from .dialects import NEED_MORE, TOKEN, StreamDetector, StreamError

__all__ = ["NEED_MORE", "TOKEN", "FirstTokenDetector", "StreamError"]


# Feed raw bytes; `feed` returns TOKEN once a chat event carries the first token. Raises StreamError for
# a malformed event, an `{"error": ...}` event or `[DONE]` before any token. (An alias, not a subclass:
# the detector is built once per attempt, and an extra constructor call is measurable there.)
FirstTokenDetector = StreamDetector
