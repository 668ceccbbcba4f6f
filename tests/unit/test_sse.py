"""The first-token detector: what counts as a first token, across arbitrary chunk boundaries."""

from __future__ import annotations

import random

import orjson
import pytest

from hedge.sse import NEED_MORE, TOKEN, FirstTokenDetector, StreamError


def ev(delta: dict | None = None, finish: str | None = None, **extra: object) -> bytes:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return (
        b"data: " + orjson.dumps({"object": "chat.completion.chunk", "choices": [choice], **extra}) + b"\n\n"
    )


ROLE = ev({"role": "assistant", "content": ""})


@pytest.mark.parametrize(
    "event",
    [
        ev({"content": "Hi"}),
        ev({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]}),
        ev({"refusal": "no"}),
        ev({"reasoning_content": "thinking"}),
        ev({"reasoning": "thinking"}),
        ev({}, finish="stop"),  # an empty answer is an answer
    ],
)
def test_token_events(event: bytes) -> None:
    d = FirstTokenDetector()
    assert d.feed(ROLE) == NEED_MORE
    assert d.feed(event) == TOKEN


@pytest.mark.parametrize(
    "noise",
    [
        ROLE,
        b": keep-alive\n\n",
        b"event: ping\n\n",
        b'data: {"choices": [], "usage": {"prompt_tokens": 3}}\n\n',
        ev({"content": ""}),
    ],
)
def test_non_token_events(noise: bytes) -> None:
    assert FirstTokenDetector().feed(noise) == NEED_MORE


def test_token_split_at_every_byte_boundary() -> None:
    stream = ROLE + b": ping\n\n" + ev({"content": "Hello"})
    for cut in range(1, len(stream)):
        d = FirstTokenDetector()
        results = [d.feed(stream[:cut]), d.feed(stream[cut:])]
        assert results[-1] == TOKEN or results[0] == TOKEN, cut
    rnd = random.Random(1)
    for _ in range(50):
        d = FirstTokenDetector()
        i, got = 0, NEED_MORE
        while i < len(stream) and got == NEED_MORE:
            j = i + rnd.randint(1, 7)
            got = d.feed(stream[i:j])
            i = j
        assert got == TOKEN


def test_crlf_events() -> None:
    d = FirstTokenDetector()
    assert d.feed(ROLE.replace(b"\n", b"\r\n")) == NEED_MORE
    assert d.feed(ev({"content": "x"}).replace(b"\n", b"\r\n")) == TOKEN


@pytest.mark.parametrize(
    "bad",
    [
        b"data: {not json\n\n",
        b"data: [DONE]\n\n",
        b'data: {"error": {"message": "overloaded"}}\n\n',
        b"data: 3\n\n",
    ],
)
def test_broken_streams_raise(bad: bytes) -> None:
    d = FirstTokenDetector()
    d.feed(ROLE)
    with pytest.raises(StreamError):
        d.feed(bad)
