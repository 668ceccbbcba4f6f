"""Validation of what the proxy needs from Responses, embeddings and legacy completions requests.

As for chat (`request.py`), only the fields the proxy acts on are checked: the model, whether to stream,
what pins a request to one provider (`previous_response_id`, `background`), and the size of the input.
Every other field passes through untouched, so new OpenAI parameters work without a proxy release. Each
problem is an `ApiError` 400 naming the parameter, with OpenAI's codes (`missing_required_parameter`,
`invalid_type`, `invalid_value`, `empty_array`, `array_above_max_length`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ApiError
from .request import CHARS_PER_TOKEN
from .request import _bad as _bad
from .request import bool_field as _flag
from .request import json_object as _object
from .request import positive_int_field as _positive_int
from .request import required_model as _model
from .request import stream_usage as _stream_usage

# OpenAI's own limit on the number of inputs in one embeddings request; a model may set a lower one.
MAX_EMBEDDING_INPUTS = 2048


def _text_chars(value: Any) -> int:
    """Characters of text anywhere in a Responses `input` (strings, `text` and `content` fields)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    if isinstance(value, dict):
        return _text_chars(value.get("content")) + _text_chars(value.get("text"))
    return 0


# ------------------------------------------------------------------------------------ /v1/responses


@dataclass(slots=True)
class ResponsesRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    background: bool
    previous_response_id: str | None
    max_output_tokens: int | None
    input_chars: int

    @property
    def pinned(self) -> bool:
        """State lives at one provider: a continuation must go to the provider that holds its parent,
        and a background response to one provider only (a hedge would start a second, billed job)."""
        return self.previous_response_id is not None or self.background

    @property
    def input_tokens_estimate(self) -> int:
        return self.input_chars // CHARS_PER_TOKEN


def parse_responses_request(raw: bytes | bytearray) -> ResponsesRequest:
    """POST /v1/responses. `input` is a string or an array of input items (objects); it may be left out
    only when a stored `prompt` supplies it."""
    body = _object(raw)
    model = _model(body)
    inp = body.get("input")
    if inp is None:
        if body.get("prompt") is None:
            raise _bad("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    elif isinstance(inp, str):
        pass
    elif isinstance(inp, list):
        if not inp and body.get("previous_response_id") is None:
            raise _bad("'input' must contain at least one item.", "input", "empty_array")
        for i, item in enumerate(inp):
            if not isinstance(item, dict):
                raise _bad(f"input[{i}] must be an object (an input item).", f"input[{i}]", "invalid_type")
    else:
        raise _bad("'input' must be a string or an array of input items.", "input", "invalid_type")
    prev = body.get("previous_response_id")
    if prev is not None and (not isinstance(prev, str) or not prev):
        raise _bad(
            "'previous_response_id' must be a non-empty string.", "previous_response_id", "invalid_type"
        )
    stream = _flag(body, "stream")
    return ResponsesRequest(
        body=body,
        model=model,
        stream=stream,
        background=_flag(body, "background"),
        previous_response_id=prev,
        max_output_tokens=_positive_int(body, "max_output_tokens"),
        input_chars=_text_chars(inp),
    )


def parse_response_id(segment: str) -> str:
    """The `{id}` of /v1/responses/{id}[/...]: our routing key, so it must look like an id at all."""
    if not segment or len(segment) > 256 or not segment.replace("_", "").replace("-", "").isalnum():
        raise ApiError(404, f"No response with id {segment[:64]!r}.", param="response_id", code="not_found")
    return segment


# ----------------------------------------------------------------------------------- /v1/embeddings


@dataclass(slots=True)
class EmbeddingsRequest:
    body: dict[str, Any]
    model: str
    inputs: int  # how many embeddings were asked for
    input_chars: int  # text characters (token arrays count 4 per token, so estimates stay comparable)

    @property
    def input_tokens_estimate(self) -> int:
        return self.input_chars // CHARS_PER_TOKEN


def _is_tokens(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _strings_or_tokens(body: dict[str, Any], key: str, *, empty_strings: bool) -> tuple[int, int]:
    """`input` of embeddings, `prompt` of completions: a string, an array of strings, an array of
    tokens (one entry) or an array of token arrays. Returns (entries, characters; a token counts as
    CHARS_PER_TOKEN so estimates stay comparable)."""
    value = body.get(key)
    if value is None:
        raise _bad(f"Missing required parameter: '{key}'.", key, "missing_required_parameter")
    if isinstance(value, str):
        if not value and not empty_strings:
            raise _bad(f"'{key}' cannot be an empty string.", key)
        return 1, len(value)
    if not isinstance(value, list):
        raise _bad(
            f"'{key}' must be a string, an array of strings, or an array of token arrays.",
            key,
            "invalid_type",
        )
    if not value:
        raise _bad(f"'{key}' must contain at least one item.", key, "empty_array")
    if _is_tokens(value):
        return 1, len(value) * CHARS_PER_TOKEN
    chars = 0
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item and not empty_strings:
                raise _bad(f"{key}[{i}] cannot be an empty string.", f"{key}[{i}]")
            chars += len(item)
        elif _is_tokens(item):
            chars += len(item) * CHARS_PER_TOKEN
        else:
            raise _bad(
                f"{key}[{i}] must be a string or an array of integer tokens.", f"{key}[{i}]", "invalid_type"
            )
    return len(value), chars


def parse_embeddings_request(
    raw: bytes | bytearray, max_inputs: int = MAX_EMBEDDING_INPUTS
) -> EmbeddingsRequest:
    """POST /v1/embeddings. `input`: a string, an array of strings, an array of tokens, or an array of
    token arrays; at most `max_inputs` entries (the model's limit), none empty."""
    body = _object(raw)
    model = _model(body)
    n, chars = _strings_or_tokens(body, "input", empty_strings=False)
    if n > max_inputs:
        raise _bad(
            f"'input' has {n} items; this model takes at most {max_inputs} per request.",
            "input",
            "array_above_max_length",
        )
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise _bad("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    _positive_int(body, "dimensions")
    return EmbeddingsRequest(body=body, model=model, inputs=n, input_chars=chars)


# ---------------------------------------------------------------------------------- /v1/completions


@dataclass(slots=True)
class CompletionsRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    max_tokens: int | None
    wants_usage: bool
    prompt_chars: int

    @property
    def prompt_tokens_estimate(self) -> int:
        return self.prompt_chars // CHARS_PER_TOKEN


def parse_completions_request(raw: bytes | bytearray) -> CompletionsRequest:
    """POST /v1/completions (legacy, FIM). `prompt`: a string, an array of strings, an array of tokens
    or an array of token arrays."""
    body = _object(raw)
    model = _model(body)
    _, chars = _strings_or_tokens(body, "prompt", empty_strings=True)
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise _bad("'suffix' must be a string.", "suffix", "invalid_type")
    stream = _flag(body, "stream")
    return CompletionsRequest(
        body=body,
        model=model,
        stream=stream,
        max_tokens=_positive_int(body, "max_tokens"),
        wants_usage=_stream_usage(body, stream),
        prompt_chars=chars + (len(suffix) if suffix else 0),
    )
