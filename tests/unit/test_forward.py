"""The committed stream's forwarder, without sockets: whole events out, the provider's bytes untouched
except for the three edits it owns (the cost line at the end, our own usage event cut, a leaked key
redacted), whatever the chunking."""

from __future__ import annotations

import itertools

import orjson
from hypothesis import example, given
from hypothesis import strategies as st

from hedge.dialects import CHAT, RESPONSES, StreamForwarder, Usage, cost_header
from hedge.secrets import REDACTED

KEY = b"sk-provider-secret-0123456789"


def chat_ev(text: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"


USAGE_EV = b'data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}\n\n'
DONE = b"data: [DONE]\n\n"
CHAT_STREAM = chat_ev("Hel") + b": keep-alive\n\n" + chat_ev("lo") + USAGE_EV + DONE
COST = 10 * 1.0 / 1e6 + 5 * 2.0 / 1e6


class Charges:
    """The `charge` callback: records what was booked, prices it at $1 / $2 per Mtok."""

    def __init__(self) -> None:
        self.booked: list[Usage | None] = []

    def __call__(self, usage: Usage | None) -> float | None:
        self.booked.append(usage)
        return None if usage is None else usage.cost_usd(1.0, 2.0)


def run(fwd: StreamForwarder, chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    """What the forwarder writes per chunk, and its last bytes."""
    return [fwd.feed(c) for c in chunks], fwd.finish()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def test_a_whole_chat_stream_gets_its_cost_line_before_done_and_loses_our_usage_event() -> None:
    charges = Charges()
    fwd = StreamForwarder(CHAT, strip_usage=True, key=None, charge=charges)
    writes, last = run(fwd, [CHAT_STREAM])
    line = b": X-GammaInfra-Cost-USD: " + cost_header(COST).encode() + b"\n\n"
    assert b"".join(writes) + last == CHAT_STREAM.replace(USAGE_EV, b"").replace(DONE, line + DONE)
    assert last.endswith(DONE)  # the end leaves with the response's end, in one write
    assert fwd.saw_end
    assert charges.booked == [Usage(10, 5)]


def test_the_callers_own_usage_event_stays() -> None:
    fwd = StreamForwarder(CHAT, strip_usage=False, key=None, charge=Charges())
    writes, last = run(fwd, [CHAT_STREAM])
    assert USAGE_EV in b"".join(writes) + last


def test_a_partial_event_is_held_until_its_end_arrives() -> None:
    fwd = StreamForwarder(CHAT, strip_usage=False, key=None, charge=Charges())
    e = chat_ev("Hello")
    assert fwd.feed(e[:7]) == b""
    assert fwd.feed(e[7:-1]) == b""
    assert fwd.feed(e[-1:] + e[:3]) == e  # the whole event, and the start of the next is held
    assert fwd.pending == e[:3]


def test_a_truncated_stream_books_its_usage_drops_the_partial_event_and_says_so() -> None:
    charges = Charges()
    fwd = StreamForwarder(CHAT, strip_usage=True, key=None, charge=charges)
    writes, last = run(fwd, [chat_ev("Hi") + USAGE_EV + b'data: {"cho'])
    assert b"".join(writes) == chat_ev("Hi")
    assert not fwd.saw_end
    assert last.startswith(b"data: {") and b"stream_truncated" in last and b"[DONE]" in last
    assert b"cho" not in last
    assert charges.booked == [Usage(10, 5)]


def test_the_providers_own_key_is_redacted_and_nothing_else_changes() -> None:
    fwd = StreamForwarder(CHAT, strip_usage=False, key=KEY, charge=Charges())
    leak = chat_ev("your key is " + KEY.decode())
    writes, last = run(fwd, [chat_ev("a"), leak, DONE])
    out = b"".join(writes) + last
    assert KEY not in out
    assert chat_ev("your key is ").replace(b'is "', b"is " + REDACTED + b'"') in out
    assert out.startswith(chat_ev("a"))


def test_a_responses_stream_gets_its_cost_after_the_terminal_event() -> None:
    created = b'event: response.created\ndata: {"type":"response.created","response":{"id":"r1"}}\n\n'
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
    done = (
        b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r1",'
        b'"usage":{"input_tokens":10,"output_tokens":5,"total_tokens":15}}}\n\n'
    )
    charges = Charges()
    fwd = StreamForwarder(RESPONSES, strip_usage=False, key=None, charge=charges)
    writes, last = run(fwd, [created + delta, done])
    assert b"".join(writes) == created + delta
    assert last == done + b": X-GammaInfra-Cost-USD: " + cost_header(COST).encode() + b"\n\n"
    assert charges.booked == [Usage(10, 5)]


def test_no_usage_means_an_unknown_cost() -> None:
    fwd = StreamForwarder(CHAT, strip_usage=False, key=None, charge=Charges())
    writes, last = run(fwd, [chat_ev("a") + DONE])
    assert writes == [b""]  # the chunk holds the end: all of it leaves with the end of the response
    assert last == chat_ev("a") + b": X-GammaInfra-Cost-USD: unknown\n\n" + DONE


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12), st.booleans())
@example([1], True)
@example([len(CHAT_STREAM) - 3], False)
@example([len(CHAT_STREAM.replace(b"\n", b"\r\n")) - len(b"\ndata: [DONE]\r\n\r\n")], True)  # CR | LF
def test_any_chunking_writes_the_same_bytes_on_event_boundaries(cuts: list[int], crlf: bool) -> None:
    stream = CHAT_STREAM.replace(b"\n", b"\r\n") if crlf else CHAT_STREAM
    whole_fwd = StreamForwarder(CHAT, strip_usage=True, key=None, charge=Charges())
    whole = b"".join(run(whole_fwd, [stream])[0]) + whole_fwd.finish()
    fwd = StreamForwarder(CHAT, strip_usage=True, key=None, charge=Charges())
    writes, last = run(fwd, split(stream, cuts))
    assert b"".join(writes) + last == whole
    for w in writes:
        assert not w or w.endswith(b"\r\n\r\n" if crlf else b"\n\n")  # whole events, whole terminators
