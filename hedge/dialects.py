"""SSE and JSON *dialects*: what a first token and a usage record look like in each OpenAI-style API.

The proxy treats every API the same way: parse an upstream answer only until its first token, then
forward the bytes untouched on event boundaries, and read the usage once, at the end, for the cost.
What differs between `/v1/chat/completions`, `/v1/responses`, `/v1/completions` and `/v1/embeddings` is
only *which* event is a token, which event is an error, where the usage sits and where a stream ends.
A `Dialect` answers exactly those questions about already-parsed JSON; everything about bytes (the SSE
framing, the first-token detector, the event boundaries, the usage and the cost trailer, and the
forwarder of a committed stream, `StreamForwarder`) is here once and shared by all dialects.

Framing (the one rule): a line ends with `\\r\\n`, `\\r` or `\\n` (the SSE spec's three terminators,
a `\\r\\n` counting as one), and an event ends at an empty line. `StreamDetector` normalises the
terminators of what it has buffered; `event_cut` finds the same boundaries in raw bytes without
copying them, because the forwarder must pass the provider's bytes exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from .errors import sse_error_event
from .secrets import REDACTED

NEED_MORE = 0
TOKEN = 1
MAX_EVENT_BYTES = 1 << 20  # an unterminated event longer than this is an attack or a broken provider
DONE_MARK = b"data: [DONE]"
USAGE_MARK = b'"usage":{'


class StreamError(Exception):
    """The upstream answer is unusable before its first token (malformed, error event, early end)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason  # malformed | error_event: the failure reason the race and metrics see


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one answer was billed for, in one shape whatever the API called them."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0  # part of input_tokens read from the provider's prompt cache

    def cost_usd(
        self, input_per_mtok: float, output_per_mtok: float, cached_per_mtok: float | None = None
    ) -> float:
        """Cost in USD; cached input tokens at their own price when the model has one."""
        cached = min(self.cached_tokens, self.input_tokens) if cached_per_mtok is not None else 0
        fresh = self.input_tokens - cached
        return (
            fresh * input_per_mtok + cached * (cached_per_mtok or 0.0) + self.output_tokens * output_per_mtok
        ) / 1e6


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _cached(details: Any) -> int:
    if isinstance(details, dict):
        return _int(details.get("cached_tokens")) or 0
    return 0


class Dialect(Protocol):
    """What differs between APIs, asked of parsed JSON only (no bytes, no I/O)."""

    name: str  # the API's label in metrics and config: chat | responses | completions | embeddings
    streams: bool  # False: the API has no streaming form (embeddings)

    def is_token(self, event: dict[str, Any]) -> bool:
        """Does this stream event carry something the caller sees as an answer?"""

    def is_error(self, event: dict[str, Any]) -> bool:
        """Is this stream event the provider reporting a failure (before the first token: a lost attempt)?"""

    def check_body(self, body: Any) -> dict[str, Any]:
        """A whole non-streaming answer: returned if complete and valid, else StreamError."""

    def usage(self, obj: dict[str, Any]) -> Usage | None:
        """Usage from a stream event or a JSON body (None when absent or not well-formed)."""

    def is_end(self, event: dict[str, Any]) -> bool:
        """Is this stream event the last one (the cost trailer goes after it)? Chat-like streams end with
        `[DONE]` instead, which is not JSON and is handled by the framing code."""


def _error_body(body: Any) -> None:
    if not isinstance(body, dict):
        raise StreamError("upstream sent a JSON answer that is not an object")
    if body.get("error"):
        raise StreamError("upstream sent an error object with status 200", "error_event")


class ChatDialect:
    """`/v1/chat/completions`: `choices[].delta`, usage in a trailing chunk, `[DONE]` at the end."""

    name = "chat"
    streams = True

    def is_token(self, event: dict[str, Any]) -> bool:
        """Role-only chunks (`{"role": "assistant", "content": ""}`) and usage-only chunks do not count:
        many providers send the role chunk at once and then think for seconds, and that must not win a
        race. A `finish_reason` counts, since an empty answer is still an answer."""
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

    def is_error(self, event: dict[str, Any]) -> bool:
        return bool(event.get("error"))

    def check_body(self, body: Any) -> dict[str, Any]:
        _error_body(body)
        if not isinstance(body.get("choices"), list):
            raise StreamError("upstream JSON answer has no 'choices' array")
        return dict(body)

    def usage(self, obj: dict[str, Any]) -> Usage | None:
        u = obj.get("usage")
        if not isinstance(u, dict):
            return None
        pt, ct = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens"))
        if pt is None or ct is None:
            return None
        return Usage(pt, ct, _cached(u.get("prompt_tokens_details")))

    def is_end(self, event: dict[str, Any]) -> bool:
        return False


class CompletionsDialect(ChatDialect):
    """Legacy `/v1/completions`: `choices[].text` chunks; usage and `[DONE]` exactly as chat."""

    name = "completions"

    def is_token(self, event: dict[str, Any]) -> bool:
        """A chunk with non-empty `text`, or a `finish_reason` (an empty completion is an answer)."""
        choices = event.get("choices")
        if not choices or not isinstance(choices, list):
            return False
        for choice in choices:
            if isinstance(choice, dict) and (choice.get("text") or choice.get("finish_reason")):
                return True
        return False


# Responses API events that carry model output (openai-python's `ResponseStreamEvent` union). Audio and
# custom-tool deltas are output too, even though the list does not name them.
RESPONSES_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.audio.delta",
        "response.audio.transcript.delta",
    }
)
RESPONSES_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})


class ResponsesDialect:
    """`/v1/responses`: typed events; `response.created`/`in_progress` come at once and are not tokens.

    The first token is a non-empty output delta or a terminal event (completed, failed, incomplete: the
    provider has decided, and an answer it decided is an answer to pass on). There is no `[DONE]`: the
    terminal event is the end, and the usage is inside its `response` object.
    """

    name = "responses"
    streams = True

    def is_token(self, event: dict[str, Any]) -> bool:
        t = event.get("type")
        if t in RESPONSES_DELTAS:
            return bool(event.get("delta"))
        return t in RESPONSES_TERMINAL

    def is_error(self, event: dict[str, Any]) -> bool:
        return event.get("type") == "error" or bool(event.get("error") and "type" not in event)

    def check_body(self, body: Any) -> dict[str, Any]:
        _error_body(body)
        if not isinstance(body.get("id"), str) or not isinstance(body.get("output"), list):
            raise StreamError("upstream JSON answer is not a response object (no 'id' or 'output')")
        return dict(body)

    def usage(self, obj: dict[str, Any]) -> Usage | None:
        resp = obj.get("response")
        u = (resp if isinstance(resp, dict) else obj).get("usage")
        if not isinstance(u, dict):
            return None
        it, ot = _int(u.get("input_tokens")), _int(u.get("output_tokens"))
        if it is None or ot is None:
            return None
        return Usage(it, ot, _cached(u.get("input_tokens_details")))

    def is_end(self, event: dict[str, Any]) -> bool:
        return event.get("type") in RESPONSES_TERMINAL


class EmbeddingsDialect:
    """`/v1/embeddings`: no stream; a valid body has `data[]` items each with an `embedding`."""

    name = "embeddings"
    streams = False

    def is_token(self, event: dict[str, Any]) -> bool:
        return False

    def is_error(self, event: dict[str, Any]) -> bool:
        return bool(event.get("error"))

    def check_body(self, body: Any) -> dict[str, Any]:
        """Complete and valid: every item's `embedding` is a non-empty array of numbers, or a base64
        string (encoding_format=base64). A truncated or half-built body must lose, not win."""
        _error_body(body)
        data = body.get("data")
        if not isinstance(data, list) or not data:
            raise StreamError("upstream embeddings answer has no 'data' items")
        for item in data:
            emb = item.get("embedding") if isinstance(item, dict) else None
            if isinstance(emb, str) and emb:
                continue
            if not isinstance(emb, list) or not emb:
                raise StreamError("upstream embeddings answer has an item without an embedding")
            if not all(isinstance(x, float | int) and not isinstance(x, bool) for x in emb):
                raise StreamError("upstream embeddings answer has a non-numeric embedding")
        return dict(body)

    def usage(self, obj: dict[str, Any]) -> Usage | None:
        u = obj.get("usage")
        if not isinstance(u, dict):
            return None
        pt = _int(u.get("prompt_tokens"))
        return None if pt is None else Usage(pt, 0)

    def is_end(self, event: dict[str, Any]) -> bool:
        return False


CHAT = ChatDialect()
RESPONSES = ResponsesDialect()
COMPLETIONS = CompletionsDialect()
EMBEDDINGS = EmbeddingsDialect()
DIALECTS: dict[str, Dialect] = {d.name: d for d in (CHAT, RESPONSES, COMPLETIONS, EMBEDDINGS)}


# ------------------------------------------------------------------------------------------ framing


def _data(raw: bytes) -> bytes | None:
    """The data payload of one event whose lines end in `\\n` (None: comment / keep-alive / name only)."""
    lines = [line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def parse_json_body(raw: bytes, dialect: Dialect) -> dict[str, Any]:
    """A non-streaming answer's bytes -> the checked body, or StreamError (the first-token rule for JSON:
    the whole body is the token, and only a complete valid one counts)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise StreamError("upstream sent a malformed JSON answer") from None
    return dialect.check_body(body)


class StreamDetector:
    """Feed raw upstream bytes; `feed` returns TOKEN once an event carries the dialect's first token.

    Raises StreamError for a malformed event, an error event or `[DONE]` before any token. Keeps only
    the unterminated tail between feeds, and never produces bytes of its own.
    """

    __slots__ = ("_buf", "dialect", "events")

    def __init__(self, dialect: Dialect = CHAT) -> None:
        self.dialect = dialect
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
                if len(self._buf) > MAX_EVENT_BYTES:
                    raise StreamError("upstream sent an SSE event over 1 MiB without an end")
                return NEED_MORE
            if self._event(buf[start:end]):
                self._buf = b""
                return TOKEN
            start = end + 2

    def _event(self, raw: bytes) -> bool:
        payload = _data(raw)
        if payload is None:
            return False
        self.events += 1
        if payload.strip() == b"[DONE]":
            raise StreamError("upstream stream ended ([DONE]) before any token")
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise StreamError("upstream sent a malformed SSE event (not JSON)") from None
        if not isinstance(event, dict):
            raise StreamError("upstream sent an SSE event that is not a JSON object")
        if self.dialect.is_error(event):
            raise StreamError("upstream sent an error event before any token", "error_event")
        return self.dialect.is_token(event)


# An empty line: a terminator (`\r\n`, a `\r` not starting one, or `\n`) and right after it another.
_BLANK = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")


def event_cut(chunk: bytes) -> int:
    """Index just past the last complete SSE event in `chunk` (0 if none).

    A `\\r` at the very end of `chunk` that ends an event counts as the end even if a `\\n` follows in
    the next chunk; that `\\n` then reads as one more empty line, which SSE clients ignore.
    """
    if b"\r" not in chunk:
        i = chunk.rfind(b"\n\n")
        return i + 2 if i >= 0 else 0
    end = 0
    for m in _BLANK.finditer(chunk):
        end = m.end()
    return end


def split_events(chunk: bytes) -> list[tuple[int, int, bytes | None]]:
    """The complete events in `chunk` as (start, end, data payload or None), positions in `chunk`."""
    out: list[tuple[int, int, bytes | None]] = []
    start = 0
    for m in _BLANK.finditer(chunk):
        raw = chunk[start : m.start()]
        if b"\r" in raw:
            raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out.append((start, m.end(), _data(raw)))
        start = m.end()
    return out


def _event_json(payload: bytes | None) -> dict[str, Any] | None:
    if payload is None:
        return None
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def _event_around(chunk: bytes, idx: int) -> tuple[int, int] | None:
    """(start, end) of the complete event holding byte `idx` of `chunk`, by the one framing rule; None
    when that event is not complete in `chunk`. Only the bytes around `idx` are scanned."""
    m = _BLANK.search(chunk, idx)
    if m is None:
        return None
    if b"\r" not in chunk:
        i = chunk.rfind(b"\n\n", 0, idx)
        return (i + 2 if i >= 0 else 0), m.end()
    start = 0
    for b in _BLANK.finditer(chunk, 0, idx):
        start = b.end()
    return start, m.end()


def take_usage(chunk: bytes, dialect: Dialect, strip: bool = False) -> tuple[bytes, Usage | None]:
    """Find the usage in a chunk of whole events (forwarded after the first token).

    Only chunks holding the usage marker are looked at, and then only the events holding it are
    parsed (a whole stream can arrive in one chunk), so the forwarder stays byte-cheap. With `strip`,
    a chat-style usage-only event (no `choices`, added because the proxy asked for usage the caller did
    not) is cut out; a Responses usage lives inside `response.completed` and is never cut.
    """
    usage: Usage | None = None
    pos = 0
    while True:
        idx = chunk.find(USAGE_MARK, pos)
        if idx < 0:
            idx = chunk.find(b'"usage": {', pos)
            if idx < 0:
                return chunk, usage
        span = _event_around(chunk, idx)
        if span is None:
            return chunk, usage
        start, end = span
        pos = end
        raw = chunk[start:end]
        if b"\r" in raw:
            raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        event = _event_json(_data(raw.rstrip(b"\n")))
        if event is None:
            continue
        u = dialect.usage(event)
        if u is None:
            continue
        usage = u
        if strip and dialect.name in ("chat", "completions") and not event.get("choices"):
            return chunk[:start] + chunk[end:], usage


_TERMINAL_HINTS = tuple(t.encode() for t in sorted(RESPONSES_TERMINAL))


def end_at(chunk: bytes, dialect: Dialect) -> int | None:
    """Where the stream's end is in a chunk of whole events, for the cost trailer: the index of
    `data: [DONE]` (chat-like: the trailer goes before it), or just past the dialect's terminal event
    (Responses: the trailer goes after it). None when this chunk does not hold the end."""
    i = chunk.find(DONE_MARK)
    if i >= 0:
        return i
    # every Responses event names "response.", so look for the terminal types themselves: most chunks
    # of a stream then cost three substring searches and no parse
    if dialect.name != "responses" or not any(t in chunk for t in _TERMINAL_HINTS):
        return None
    for _start, end, payload in split_events(chunk):
        if payload is None or not any(t in payload for t in _TERMINAL_HINTS):
            continue
        event = _event_json(payload)
        if event is not None and dialect.is_end(event):
            return end
    return None


def insert_cost(chunk: bytes, at: int, value: str) -> bytes:
    """Put `: X-GammaInfra-Cost-USD: <value>` (an SSE comment, ignored by SSE clients) at `at`."""
    return chunk[:at] + b": X-GammaInfra-Cost-USD: " + value.encode() + b"\n\n" + chunk[at:]


# ------------------------------------------------------------------- the committed stream's forwarder
#
# After the first token nothing is parsed any more; the bytes are the provider's own, in order.
# `StreamForwarder` is the one look the proxy still takes at them, chunk by chunk, and it is cheap:
# - whole events only: a partial event is held until its end arrives (`event_cut`), so a cut never
#   falls inside an event, and a stream cut short ends on a boundary followed by our error event;
# - the provider's own key is redacted if the provider echoed it (one `in` per chunk, see secrets.py);
# - the usage is taken where a chunk carries it (one `in` per chunk, parsed only there, `take_usage`),
#   and a usage event the caller did not ask for is cut out again;
# - at the stream's end (`end_at`) the cost comment line goes in (`insert_cost`), and that last piece is
#   held so it leaves together with the chunked terminator in one write.
# `feed(chunk)` returns the bytes to write now; `finish()` the last bytes when the upstream ends. The
# I/O around it (reads, writes, timeouts) is `Proxy._pump`'s.

PENDING_LIMIT = 1 << 20  # a partial event longer than this is forwarded as it is rather than held
USAGE_HINT = b'"usage"'  # in every usage marker take_usage knows (with or without a space)


def cost_header(cost: float) -> str:
    """The cost as the `X-GammaInfra-Cost-USD` header and the stream's cost comment write it."""
    return f"{cost:.10f}"


class StreamForwarder:
    """Event-aligned forwarding of one committed stream (see the module docstring)."""

    __slots__ = (
        "charge",
        "dialect",
        "held",
        "key",
        "pending",
        "saw_end",
        "strip_usage",
        "typed_end",
        "usage",
    )

    def __init__(
        self,
        dialect: Dialect,
        *,
        strip_usage: bool,
        key: bytes | None,
        charge: Callable[[Usage | None], float | None],
    ) -> None:
        self.dialect = dialect
        self.strip_usage = strip_usage
        self.key = key  # the serving provider's own key, to redact if it shows up in its stream
        self.charge = charge  # books the usage (metrics, key spend) and returns its cost
        self.typed_end = dialect is RESPONSES  # ends at a terminal event, not at `data: [DONE]`
        self.usage: Usage | None = None
        self.saw_end = False  # the stream's own end marker went by: the answer is complete
        self.pending = b""  # a partial SSE event, held until its end arrives
        self.held = b""  # the piece with the end marker: it leaves with the end of the response

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to write for this upstream chunk (maybe none yet)."""
        if self.pending:
            chunk = self.pending + chunk
            self.pending = b""
        if not chunk.endswith(b"\n\n"):
            # a chunk that ends in CR may end halfway through a CRLF: whether its last event is over
            # shows only with the next byte, so the cut is looked for before that CR (an LF would
            # otherwise arrive alone, and when the event was our usage event and cut out, stay behind)
            cut = event_cut(chunk[:-1] if chunk.endswith(b"\r") else chunk)
            if cut == 0 and len(chunk) < PENDING_LIMIT:
                self.pending = chunk
                return b""
            if 0 < cut < len(chunk):
                chunk, self.pending = chunk[:cut], chunk[cut:]
        if not chunk:
            return b""
        if self.key is not None and self.key in chunk:
            # the provider echoed our key into its stream: the one edit of its bytes we make for safety
            chunk = chunk.replace(self.key, REDACTED)
        if USAGE_HINT in chunk:
            chunk, u = take_usage(chunk, self.dialect, self.strip_usage)
            if u is not None:
                self.usage = u
        out = self.held  # bytes after the end: unusual, but forwarded in order
        self.held = b""
        at = end_at(chunk, self.dialect) if self.typed_end or DONE_MARK in chunk else None
        if at is None:
            return out + chunk if out else chunk
        self.saw_end = True
        cost = self.charge(self.usage)
        self.usage = None
        self.held = insert_cost(chunk, at, cost_header(cost) if cost is not None else "unknown")
        return out

    def finish(self) -> bytes:
        """The last bytes once the upstream body ended. A stream that never reached its end marker was
        cut short: its usage so far is booked, a partial last event is dropped (as an SSE client drops
        an unterminated event) and an error event says the answer is incomplete."""
        if self.saw_end:
            return self.held + self.pending
        self.charge(self.usage)
        what = "its terminal event" if self.typed_end else "[DONE]"
        return sse_error_event(f"The upstream stream ended before {what}.", code="stream_truncated")
