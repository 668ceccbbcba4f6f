"""API dialects: first tokens, errors, usage and stream ends per API, and the one SSE framing rule."""

from __future__ import annotations

import random

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hedge.dialects import (
    CHAT,
    COMPLETIONS,
    DIALECTS,
    EMBEDDINGS,
    NEED_MORE,
    RESPONSES,
    TOKEN,
    StreamDetector,
    StreamError,
    Usage,
    end_at,
    event_cut,
    insert_cost,
    parse_json_body,
    split_events,
    take_usage,
)


def rev(type_: str, **fields: object) -> bytes:
    """One Responses API event, framed as OpenAI sends it (an `event:` line, then `data:`)."""
    return b"event: " + type_.encode() + b"\ndata: " + orjson.dumps({"type": type_, **fields}) + b"\n\n"


RESP: dict[str, object] = {
    "id": "resp_1",
    "object": "response",
    "status": "in_progress",
    "output": [],
    "usage": None,
}
CREATED = rev("response.created", response=RESP, sequence_number=0)
IN_PROGRESS = rev("response.in_progress", response=RESP, sequence_number=1)
USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"cached_tokens": 8},
    "output_tokens": 5,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 17,
}
COMPLETED = rev("response.completed", response={**RESP, "status": "completed", "usage": USAGE})


@pytest.mark.parametrize(
    "event",
    [
        rev("response.output_text.delta", delta="Hi", item_id="m", output_index=0, content_index=0),
        rev("response.refusal.delta", delta="no"),
        rev("response.reasoning_text.delta", delta="hmm"),
        rev("response.reasoning_summary_text.delta", delta="plan"),
        rev("response.function_call_arguments.delta", delta='{"a"'),
        COMPLETED,
        rev("response.failed", response={**RESP, "status": "failed"}),
        rev("response.incomplete", response={**RESP, "status": "incomplete"}),
    ],
)
def test_responses_token_events(event: bytes) -> None:
    d = StreamDetector(RESPONSES)
    assert d.feed(CREATED + IN_PROGRESS) == NEED_MORE
    assert d.feed(event) == TOKEN


@pytest.mark.parametrize(
    "noise",
    [
        CREATED,
        IN_PROGRESS,
        rev("response.queued", response=RESP),
        rev("response.output_item.added", item={"type": "message"}),
        rev("response.content_part.added", part={"type": "output_text", "text": ""}),
        rev("response.output_text.delta", delta=""),  # an empty delta is not output yet
        b": keep-alive\n\n",
    ],
)
def test_responses_non_token_events(noise: bytes) -> None:
    assert StreamDetector(RESPONSES).feed(noise) == NEED_MORE


def test_responses_error_event_before_token_fails_the_attempt() -> None:
    d = StreamDetector(RESPONSES)
    with pytest.raises(StreamError) as e:
        d.feed(CREATED + rev("error", code="server_error", message="boom", param=None))
    assert e.value.reason == "error_event"


def test_completions_tokens() -> None:
    def ev(text: str, finish: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        chunk = {"object": "text_completion", "choices": [choice]}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    d = StreamDetector(COMPLETIONS)
    assert d.feed(ev("")) == NEED_MORE
    assert d.feed(ev("def")) == TOKEN
    assert StreamDetector(COMPLETIONS).feed(ev("", "length")) == TOKEN
    with pytest.raises(StreamError):
        StreamDetector(COMPLETIONS).feed(b"data: [DONE]\n\n")
    # chat's delta shape is not a completions token, and the other way round
    chat_chunk = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    assert StreamDetector(COMPLETIONS).feed(chat_chunk) == NEED_MORE
    assert StreamDetector(CHAT).feed(ev("def")) == NEED_MORE


@pytest.mark.parametrize("dialect", [CHAT, RESPONSES, COMPLETIONS])
@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_at_every_split(dialect: object, nl: bytes) -> None:
    """One framing rule for all dialects: each of the three terminators, split at every byte."""
    token = {
        "chat": b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n',
        "responses": rev("response.output_text.delta", delta="x"),
        "completions": b'data: {"choices":[{"index":0,"text":"x"}]}\n\n',
    }[dialect.name]  # type: ignore[attr-defined]
    stream = (b": ping\n\n" + (CREATED if dialect is RESPONSES else b"") + token).replace(b"\n", nl)
    for cut in range(1, len(stream)):
        d = StreamDetector(dialect)  # type: ignore[arg-type]
        assert TOKEN in (d.feed(stream[:cut]), d.feed(stream[cut:])), cut
        if cut < len(stream) - len(nl):  # before the empty line that ends the token event
            d = StreamDetector(dialect)  # type: ignore[arg-type]
            assert d.feed(stream[:cut]) == NEED_MORE, cut


@pytest.mark.parametrize(
    ("body", "dialect"),
    [
        ({"id": "resp_1", "object": "response", "output": [], "usage": USAGE}, RESPONSES),
        ({"object": "list", "data": [{"embedding": [0.1, -2, 3.5], "index": 0}]}, EMBEDDINGS),
        ({"object": "list", "data": [{"embedding": "AAAAPw==", "index": 0}]}, EMBEDDINGS),
        ({"choices": [{"text": "x"}]}, COMPLETIONS),
        ({"choices": []}, CHAT),
    ],
)
def test_valid_json_bodies(body: dict, dialect: object) -> None:
    assert parse_json_body(orjson.dumps(body), dialect) == body  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "dialect", "reason"),
    [
        (b'{"data": [{"embedding": [0.1, 0.2]', EMBEDDINGS, "malformed"),  # truncated
        (b'{"object": "list", "data": []}', EMBEDDINGS, "malformed"),
        (b'{"data": [{"embedding": []}]}', EMBEDDINGS, "malformed"),
        (b'{"data": [{"embedding": [0.1, "x"]}]}', EMBEDDINGS, "malformed"),
        (b'{"data": [{"embedding": [true]}]}', EMBEDDINGS, "malformed"),
        (b'{"data": [{"index": 0}]}', EMBEDDINGS, "malformed"),
        (b'{"error": {"message": "overloaded"}}', EMBEDDINGS, "error_event"),
        (b'{"object": "response", "output": []}', RESPONSES, "malformed"),
        (b'{"id": "resp_1"}', RESPONSES, "malformed"),
        (b"[1, 2]", RESPONSES, "malformed"),
        (b'{"object": "text_completion"}', COMPLETIONS, "malformed"),
    ],
)
def test_invalid_json_bodies(raw: bytes, dialect: object, reason: str) -> None:
    with pytest.raises(StreamError) as e:
        parse_json_body(raw, dialect)  # type: ignore[arg-type]
    assert e.value.reason == reason


def test_usage_per_dialect() -> None:
    chat_u = {"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}
    assert CHAT.usage({"usage": chat_u}) == Usage(10, 3, 4)
    assert COMPLETIONS.usage({"usage": {"prompt_tokens": 1, "completion_tokens": 2}}) == Usage(1, 2)
    assert RESPONSES.usage({"usage": USAGE}) == Usage(12, 5, 8)  # a JSON response body
    completed = orjson.loads(COMPLETED.split(b"data: ")[1])
    assert RESPONSES.usage(completed) == Usage(12, 5, 8)  # a response.completed event
    assert RESPONSES.usage(orjson.loads(CREATED.split(b"data: ")[1])) is None  # usage: null
    assert EMBEDDINGS.usage({"usage": {"prompt_tokens": 7, "total_tokens": 7}}) == Usage(7, 0)
    for bad in ({"usage": {"prompt_tokens": "7"}}, {"usage": {"prompt_tokens": -1}}, {"usage": None}, {}):
        assert EMBEDDINGS.usage(bad) is None
    assert CHAT.usage({"usage": {"prompt_tokens": True, "completion_tokens": 1}}) is None


def test_usage_cost_with_and_without_a_cached_price() -> None:
    u = Usage(1_000_000, 1_000_000, 400_000)
    assert u.cost_usd(1.0, 2.0) == pytest.approx(3.0)  # no cached price: cached tokens at the input price
    assert u.cost_usd(1.0, 2.0, 0.1) == pytest.approx(0.6 + 0.04 + 2.0)
    assert Usage(5, 0, 9).cost_usd(1.0, 0.0, 0.0) == 0.0  # cached never exceeds input


def test_stream_usage_and_end_for_responses() -> None:
    delta = rev("response.output_text.delta", delta="Hi")
    chunk = delta + COMPLETED
    same, usage = take_usage(chunk, RESPONSES, strip=True)
    assert same == chunk and usage == Usage(12, 5, 8)  # never cut: the usage is in response.completed
    at = end_at(chunk, RESPONSES)
    assert at == len(chunk)
    out = insert_cost(chunk, at, "0.000001")
    assert out == chunk + b": X-GammaInfra-Cost-USD: 0.000001\n\n"
    assert end_at(delta, RESPONSES) is None
    # a delta whose text mentions the terminal event's name is not the end
    tricky = rev("response.output_text.delta", delta='the "response.completed" event')
    assert end_at(tricky, RESPONSES) is None


def test_stream_usage_and_end_for_chat() -> None:
    fin = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
    done = b"data: [DONE]\n\n"
    chunk = fin + usage + done
    stripped, u = take_usage(chunk, CHAT, strip=True)
    assert stripped == fin + done and u == Usage(4, 2)
    kept, u = take_usage(chunk, CHAT, strip=False)
    assert kept == chunk and u == Usage(4, 2)
    assert end_at(chunk, CHAT) == len(fin + usage)
    assert take_usage(fin, CHAT) == (fin, None)


@pytest.mark.parametrize(
    ("chunk", "cut"),
    [
        (b"data: a\n\ndata: b", 9),
        (b"data: a\r\n\r\ndata: b", 11),
        (b"data: a\r\rdata: b", 9),
        (b"data: a\r\n\ndata: b", 10),
        (b"data: a\n\r\ndata: b", 10),
        (b"data: a\r\ndata: b", 0),  # one CRLF ends a line, not an event
        (b"data: a\r\n", 0),
        (b"data: a", 0),
    ],
)
def test_event_cut(chunk: bytes, cut: int) -> None:
    assert event_cut(chunk) == cut


_terminators = st.sampled_from([b"\n", b"\r\n", b"\r"])


@given(st.lists(st.tuples(st.integers(0, 99), _terminators, _terminators), min_size=1, max_size=6))
def test_event_cut_and_detector_agree(events: list[tuple[int, bytes, bytes]]) -> None:
    """The raw-bytes cut and the detector's normalised buffer see the same events."""
    # a bare CR then LF would be one CRLF terminator, not two: leave that pair out
    pairs = [(n, t1, t2) for n, t1, t2 in events if not (t1 == b"\r" and t2 == b"\n")]
    raw = b"".join(b"data: " + str(n).encode() + t1 + t2 for n, t1, t2 in pairs)
    parts = split_events(raw)
    assert event_cut(raw) == (parts[-1][1] if parts else 0)
    normalised = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    assert [p[2] for p in parts] == [e[6:] for e in normalised.split(b"\n\n")[:-1]]


def test_dialect_registry() -> None:
    assert set(DIALECTS) == {"chat", "responses", "completions", "embeddings"}
    assert not EMBEDDINGS.streams and all(DIALECTS[n].streams for n in ("chat", "responses", "completions"))


def test_responses_random_chunking() -> None:
    stream = (
        CREATED
        + IN_PROGRESS
        + rev("response.output_item.added", item={})
        + rev("response.output_text.delta", delta="Hello")
    )
    rnd = random.Random(3)
    for _ in range(200):
        d = StreamDetector(RESPONSES)
        i, result = 0, NEED_MORE
        while i < len(stream) and result == NEED_MORE:
            n = rnd.randint(1, 40)
            result = d.feed(stream[i : i + n])
            i += n
        assert result == TOKEN and i >= len(stream) - 2  # TOKEN only once the delta event ended
