"""The winner's stream after the commit, as whole SSE events: what to write, decided without I/O.

After the first token nothing is parsed any more (docs/design.md, "The request path"); the bytes are the
provider's own, in order. `StreamForwarder` is the one look the proxy still takes at them, chunk by
chunk, and it is deliberately cheap:

- it forwards whole events only, holding back a partial event until its end arrives (so a cut never
  falls inside an event, and a stream cut short ends on an event boundary followed by our error event);
- it redacts the provider's own key if the provider echoed it (one `in` per chunk, see secrets.py);
- it takes the usage where a chunk carries it (one `in` per chunk, parsed only there), and for a chat-like
  stream whose caller did not ask for usage, cuts that event out again;
- at the stream's end (`dialects.end_at`: before `data: [DONE]`, or after a Responses terminal event) it
  puts the cost comment line, and holds that last piece back so it leaves together with the chunked
  terminator in one write.

`feed(chunk)` returns the bytes to write now; `finish()` the last bytes when the upstream ends. The I/O
around it (reading, writing, timeouts) is `Proxy._pump`'s.
"""

from __future__ import annotations

from collections.abc import Callable

from .dialects import DONE_MARK, RESPONSES, Dialect, Usage, end_at, event_cut, insert_cost, take_usage
from .errors import sse_error_event
from .secrets import REDACTED

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
            cut = event_cut(chunk)
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
