"""Validation of Responses, embeddings and completions requests: OpenAI error codes naming the parameter."""

from __future__ import annotations

import orjson
import pytest

from hedge.apirequests import (
    MAX_EMBEDDING_INPUTS,
    parse_completions_request,
    parse_embeddings_request,
    parse_response_id,
    parse_responses_request,
)
from hedge.errors import ApiError


def raw(**body: object) -> bytes:
    return orjson.dumps(body)


def test_responses_minimal_and_full() -> None:
    r = parse_responses_request(raw(model="m", input="Say hi"))
    assert (r.model, r.stream, r.background, r.previous_response_id, r.pinned) == (
        "m",
        False,
        False,
        None,
        False,
    )
    assert r.input_chars == 6
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "abcd"}]},
        {"role": "user", "content": "ef"},
    ]
    r = parse_responses_request(
        raw(model="m", input=items, stream=True, previous_response_id="resp_1", max_output_tokens=5, foo=1)
    )
    assert r.stream and r.pinned and r.previous_response_id == "resp_1" and r.max_output_tokens == 5
    assert r.input_chars == 6 and r.body["foo"] == 1  # unknown fields pass through
    assert parse_responses_request(raw(model="m", input="x", background=True)).pinned
    assert parse_responses_request(raw(model="m", prompt={"id": "pmpt_1"})).input_chars == 0
    assert parse_responses_request(raw(model="m", input=[], previous_response_id="resp_1")).pinned


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"", None, "invalid_json"),
        (b"{nope", None, "invalid_json"),
        (b"[]", None, "invalid_json"),
        (raw(input="x"), "model", "missing_required_parameter"),
        (raw(model=3, input="x"), "model", "invalid_type"),
        (raw(model="m"), "input", "missing_required_parameter"),
        (raw(model="m", input=5), "input", "invalid_type"),
        (raw(model="m", input=[]), "input", "empty_array"),
        (raw(model="m", input=["hi"]), "input[0]", "invalid_type"),
        (raw(model="m", input="x", stream="yes"), "stream", "invalid_type"),
        (raw(model="m", input="x", background=1), "background", "invalid_type"),
        (raw(model="m", input="x", previous_response_id=""), "previous_response_id", "invalid_type"),
        (raw(model="m", input="x", max_output_tokens=0), "max_output_tokens", "invalid_value"),
    ],
)
def test_responses_bad_input(body: bytes, param: str | None, code: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_responses_request(body)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    assert orjson.loads(e.value.body())["error"]["type"] == "invalid_request_error"


def test_response_id() -> None:
    assert parse_response_id("resp_abc-123") == "resp_abc-123"
    for bad in ("", "../x", "a" * 300, "resp 1"):
        with pytest.raises(ApiError) as e:
            parse_response_id(bad)
        assert e.value.status == 404 and e.value.code == "not_found"


@pytest.mark.parametrize(
    ("inp", "n", "chars"),
    [
        ("hello", 1, 5),
        (["ab", "cde"], 2, 5),
        ([1, 2, 3], 1, 12),  # one token array
        ([[1, 2], [3]], 2, 12),
        (["ab", [1]], 2, 6),
    ],
)
def test_embeddings_inputs(inp: object, n: int, chars: int) -> None:
    r = parse_embeddings_request(raw(model="e", input=inp, encoding_format="base64", dimensions=64))
    assert (r.model, r.inputs, r.input_chars) == ("e", n, chars)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (raw(model="e"), "input", "missing_required_parameter"),
        (raw(model="e", input=""), "input", "invalid_value"),
        (raw(model="e", input=[]), "input", "empty_array"),
        (raw(model="e", input={"a": 1}), "input", "invalid_type"),
        (raw(model="e", input=["ok", ""]), "input[1]", "invalid_value"),
        (raw(model="e", input=["ok", 3.5]), "input[1]", "invalid_type"),
        (raw(model="e", input=["ok", [True]]), "input[1]", "invalid_type"),
        (raw(model="e", input=["x"] * (MAX_EMBEDDING_INPUTS + 1)), "input", "array_above_max_length"),
        (raw(model="e", input="x", encoding_format="int8"), "encoding_format", "invalid_value"),
        (raw(model="e", input="x", dimensions="64"), "dimensions", "invalid_type"),
        (raw(input="x"), "model", "missing_required_parameter"),
    ],
)
def test_embeddings_bad_input(body: bytes, param: str, code: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_embeddings_request(body)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)


def test_embeddings_limit_is_the_models() -> None:
    parse_embeddings_request(raw(model="e", input=["a"] * 3), max_inputs=3)
    with pytest.raises(ApiError) as e:
        parse_embeddings_request(raw(model="e", input=["a"] * 4), max_inputs=3)
    assert "at most 3" in e.value.message


def test_completions() -> None:
    r = parse_completions_request(
        raw(model="c", prompt="def f(", suffix="\n", stream=True, stream_options={"include_usage": True})
    )
    assert (r.model, r.stream, r.wants_usage, r.prompt_chars, r.max_tokens) == ("c", True, True, 7, None)
    assert parse_completions_request(raw(model="c", prompt=[[1, 2], "ab"], max_tokens=9)).max_tokens == 9


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (raw(model="c"), "prompt", "missing_required_parameter"),
        (raw(model="c", prompt=[]), "prompt", "empty_array"),
        (raw(model="c", prompt=7), "prompt", "invalid_type"),
        (raw(model="c", prompt=["a", {}]), "prompt[1]", "invalid_type"),
        (raw(model="c", prompt="a", suffix=1), "suffix", "invalid_type"),
        (raw(model="c", prompt="a", max_tokens=0), "max_tokens", "invalid_value"),
        (raw(model="c", prompt="a", stream_options={}), "stream_options", "invalid_value"),
        (raw(model="c", prompt="a", stream=True, stream_options=[]), "stream_options", "invalid_type"),
    ],
)
def test_completions_bad_input(body: bytes, param: str, code: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_completions_request(body)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
