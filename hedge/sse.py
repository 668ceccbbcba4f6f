"""Incremental SSE parsing, only as far as the first token (DESIGN §1.4).

The proxy must know *when* an attempt has produced its first real token, but it must not pay for parsing
the rest of the stream: once an attempt wins, its bytes are forwarded untouched. So this parser is fed raw
upstream chunks only until it answers TOKEN, and it never produces bytes of its own.
"""

from __future__ import annotations

from typing import Any

import orjson

NEED_MORE = 0
TOKEN = 1


class StreamError(Exception):
    """The upstream stream is unusable before its first token (malformed, error event, early end)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason  # malformed | error_event: the failure reason the race and metrics see


def _is_first_token(event: dict[str, Any]) -> bool:
    """True when an event carries something the caller will see as an answer.

    Role-only chunks (`{"role": "assistant", "content": ""}`) and usage-only chunks do not count: many
    providers send the role chunk at once and then think for seconds, and that must not win a race.
    A `finish_reason` counts, since an empty answer is still an answer.
    """
    choices = event.get("choices")
    if not choices or not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            return True
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        if delta.get("content") or delta.get("tool_calls") or delta.get("refusal"):
            return True
        if delta.get("reasoning_content") or delta.get("reasoning") or delta.get("function_call"):
            return True
    return False


class FirstTokenDetector:
    """Feed raw bytes; `feed` returns TOKEN once an event carries the first token.

    Raises StreamError for a malformed event, an `{"error": ...}` event or `[DONE]` before any token.
    """

    __slots__ = ("_buf", "events")

    def __init__(self) -> None:
        self._buf = b""
        self.events = 0

    def feed(self, data: bytes) -> int:
        buf = self._buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                self._buf = buf[start:]
                if len(self._buf) > 1 << 20:
                    raise StreamError("upstream sent an SSE event over 1 MiB without an end")
                return NEED_MORE
            if self._event(buf[start:end]):
                self._buf = b""
                return TOKEN
            start = end + 2

    def _event(self, raw: bytes) -> bool:
        data_lines = [line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")]
        if not data_lines:
            return False  # comment / keep-alive / event-name only
        payload = b"\n".join(data_lines)
        self.events += 1
        if payload.strip() == b"[DONE]":
            raise StreamError("upstream stream ended ([DONE]) before any token")
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise StreamError("upstream sent a malformed SSE event (not JSON)") from None
        if not isinstance(event, dict):
            raise StreamError("upstream sent an SSE event that is not a JSON object")
        if event.get("error"):
            raise StreamError("upstream sent an error event before any token", "error_event")
        return _is_first_token(event)
