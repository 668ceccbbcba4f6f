"""Validation of what the proxy itself needs from a chat request (docs/design.md, "The request path").

Only the fields the proxy acts on are checked (model, messages, stream, max_tokens, stream_options);
every other field passes through to the provider untouched, so new OpenAI parameters work without a
proxy release. Each problem is a 400 naming the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import ApiError

# Token estimates without a tokenizer. For cost estimates (wasted attempts) we use characters / 4, the
# usual figure for English. A prompt is rejected before any upstream call only when it *clearly* exceeds
# the context window: there we count characters / 6, more characters per token than common tokenizers
# average on any text (English ~4, code and CJK fewer), so a prompt that fits is never rejected.
CHARS_PER_TOKEN = 4
CHARS_PER_TOKEN_MAX = 6


@dataclass(slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    max_tokens: int | None
    wants_usage: bool  # the caller asked for the usage chunk (stream_options.include_usage)
    prompt_chars: int

    @property
    def prompt_tokens_estimate(self) -> int:
        return self.prompt_chars // CHARS_PER_TOKEN + 4 * len(self.body["messages"])

    @property
    def prompt_tokens_lower_bound(self) -> int:
        return self.prompt_chars // CHARS_PER_TOKEN_MAX


def _bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# Field checks shared by every API's parser (here for chat, hedge/apirequests.py for the others), so
# the same mistake gets the same OpenAI error whichever endpoint it was sent to.


def json_object(raw: bytes | bytearray) -> dict[str, Any]:
    """The body as a JSON object, or a 400 `invalid_json`."""
    if not raw:
        raise _bad("The request body is empty; expected a JSON object.", None, "invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _bad(
            f"The request body is not valid JSON: {e.msg} (at byte {e.pos}).", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", None, "invalid_json")
    return body


def required_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise _bad("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _bad("'model' must be a non-empty string.", "model", "invalid_type")
    return model


def bool_field(body: dict[str, Any], key: str) -> bool:
    """An optional boolean (null = false)."""
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"'{key}' must be a boolean.", key, "invalid_type")
    return v


def positive_int_field(body: dict[str, Any], key: str) -> int | None:
    """An optional integer >= 1."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{key}' must be an integer.", key, "invalid_type")
    if v < 1:
        raise _bad(f"'{key}' must be at least 1.", key)
    return v


def stream_usage(body: dict[str, Any], stream: bool) -> bool:
    """`stream_options.include_usage`: only with `stream`, and a boolean."""
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise _bad("'stream_options' must be an object.", "stream_options", "invalid_type")
    if not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    iu = so.get("include_usage", False)
    if not isinstance(iu, bool):
        raise _bad("'stream_options.include_usage' must be a boolean.", "stream_options.include_usage")
    return iu


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        n = 0
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                n += len(part["text"])
        return n
    return 0


def parse_chat_request(raw: bytes | bytearray, *, max_messages: int | None = None) -> ChatRequest:
    """Parse and validate; `max_messages` bounds the conversation length (hedge/body.py bounds the
    JSON as a whole before this parse)."""
    body = json_object(raw)
    model = required_model(body)

    messages = body.get("messages")
    if messages is None:
        raise _bad("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise _bad("'messages' must be an array of message objects.", "messages", "invalid_type")
    if not messages:
        raise _bad("'messages' must contain at least one message.", "messages", "empty_array")
    if max_messages is not None and len(messages) > max_messages:
        raise _bad(
            f"'messages' has {len(messages)} entries; this gateway accepts at most {max_messages}.",
            "messages",
            "too_many_messages",
        )
    chars = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object.", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(
                f"messages[{i}].role must be a non-empty string.", f"messages[{i}].role", "invalid_type"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(
                f"messages[{i}].content must be a string or an array of content parts.",
                f"messages[{i}].content",
                "invalid_type",
            )
        chars += _content_chars(content)

    stream = bool_field(body, "stream")
    max_tokens: int | None = None
    for key in ("max_completion_tokens", "max_tokens"):
        v = positive_int_field(body, key)
        if v is not None:
            max_tokens = v if max_tokens is None else max(max_tokens, v)
    wants_usage = stream_usage(body, stream)

    return ChatRequest(
        body=body,
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        wants_usage=wants_usage,
        prompt_chars=chars,
    )


def parse_cost_quality(value: str | None) -> float | None:
    """X-GammaInfra-Cost-Quality: a number in [0, 1] (0 = cheapest, 1 = best quality / lowest latency)."""
    if value is None:
        return None
    try:
        x = float(value.strip())
    except ValueError:
        x = float("nan")
    if not 0.0 <= x <= 1.0:  # also false for NaN
        raise ApiError(
            400,
            f"X-GammaInfra-Cost-Quality must be a number between 0 (cost) and 1 (quality), got {value!r}.",
            param="X-GammaInfra-Cost-Quality",
            code="invalid_header",
        )
    return x


def parse_preference(value: str | None, known: set[str]) -> tuple[str, ...]:
    """X-GammaInfra-Preference: comma-separated providers, models or model@provider, most preferred first."""
    if value is None:
        return ()
    names = tuple(p.strip() for p in value.split(",") if p.strip())
    if not names:
        raise ApiError(
            400, "X-GammaInfra-Preference is empty.", param="X-GammaInfra-Preference", code="invalid_header"
        )
    for n in names:
        if n not in known:
            raise ApiError(
                400,
                f"X-GammaInfra-Preference names {n!r}, which is not a known provider, model or "
                "model@provider.",
                param="X-GammaInfra-Preference",
                code="invalid_header",
            )
    return names
