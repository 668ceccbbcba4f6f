"""Wire formats the simulated provider speaks besides chat: Responses API events and objects, legacy
completions chunks, embeddings, and the short sentences its answers are made of.

Kept apart from `simprovider` (the HTTP and timing side) so each format can be read against OpenAI's
reference on its own. Shapes follow openai-python's types, so the official SDK parses them
(`tests/integration/test_simprovider_apis.py` proves it with the SDK as the client).
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from typing import Any

import orjson

# Prose for generated answers: demo output reads as text. Which sentence starts an answer depends on
# the provider and the request, so two answers (and two providers) still differ. The short ones let an
# answer of any length end on a whole sentence.
SENTENCES = (
    "The fastest provider answered first, and the slower ones were cancelled.",
    "A hedged request waits a little, then asks a second provider as well.",
    "Tail latency falls when a stalled call is raced by a fresh one.",
    "Every extra attempt is counted against a small budget.",
    "The winner's bytes pass through exactly as the provider sent them.",
    "Thanks for asking.",
    "That is all.",
    "Hello!",
)


_LONG = [s.split() for s in SENTENCES[:5]]
_SHORT = [s.split() for s in SENTENCES[5:]]  # fillers, longest first


def prose_words(seed: str, n: int) -> list[str]:
    """`n` words (each with its trailing space) of whole sentences, starting at one chosen by `seed`:
    each next sentence is the next long one that still fits, else the longest filler that does."""
    i = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=4).digest(), "big")
    words: list[str] = []
    while len(words) < n:
        room = n - len(words)
        fits = [_LONG[(i + k) % len(_LONG)] for k in range(len(_LONG))] + _SHORT
        sentence = next(s for s in fits if len(s) <= room)  # "Hello!" always fits
        if sentence in _LONG:
            i = _LONG.index(sentence) + 1
        words.extend(w + " " for w in sentence)
    return words


# ------------------------------------------------------------------------------------ Responses API


def response_object(
    rid: str,
    model: str,
    status: str,
    *,
    created_at: int,
    text: str | None = None,
    usage: dict[str, Any] | None = None,
    previous_response_id: str | None = None,
    background: bool = False,
    msg_id: str = "",
) -> dict[str, Any]:
    """A `Response` object (openai-python `types.responses.Response`) with at most one output message."""
    output: list[dict[str, Any]] = []
    if text is not None:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        output.append(
            {"id": msg_id, "type": "message", "role": "assistant", "status": "completed", "content": [part]}
        )
    return {
        "id": rid,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": background,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": previous_response_id,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "metadata": {},
    }


def response_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


class ResponsesSse:
    """The events of one streamed response, in OpenAI's order and framing (`event:` + `data:` lines).

    `opening()` is response.created and response.in_progress together: providers send both at once,
    long before any output, which is exactly what the proxy must not mistake for a first token.
    """

    __slots__ = ("_base", "_msg", "_seq", "_text", "background", "model", "previous", "rid")

    def __init__(self, rid: str, model: str, previous: str | None, background: bool) -> None:
        self.rid, self.model, self.previous, self.background = rid, model, previous, background
        self._msg = "msg_" + rid.removeprefix("resp_")
        self._seq = 0
        self._text: list[str] = []
        self._base = int(time.time())

    def _event(self, type_: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": type_, "sequence_number": self._seq, **fields})
        self._seq += 1
        return b"event: " + type_.encode() + b"\ndata: " + data + b"\n\n"

    def obj(
        self, status: str, text: str | None = None, usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return response_object(
            self.rid,
            self.model,
            status,
            created_at=self._base,
            text=text,
            usage=usage,
            previous_response_id=self.previous,
            background=self.background,
            msg_id=self._msg,
        )

    def opening(self) -> bytes:
        created = self._event("response.created", response=self.obj("in_progress"))
        return created + self._event("response.in_progress", response=self.obj("in_progress"))

    def content(self, text: str) -> bytes:
        head = b""
        if not self._text:  # the message item and its text part open with the first delta
            item = {
                "id": self._msg,
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            head = self._event("response.output_item.added", output_index=0, item=item) + self._event(
                "response.content_part.added", item_id=self._msg, output_index=0, content_index=0, part=part
            )
        self._text.append(text)
        return head + self._event(
            "response.output_text.delta",
            item_id=self._msg,
            output_index=0,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def closing(self, input_tokens: int) -> tuple[bytes, dict[str, Any]]:
        """The done events and response.completed; also the final object, for GET /v1/responses/{id}."""
        text = "".join(self._text)
        final = self.obj("completed", text, response_usage(input_tokens, len(self._text)))
        out = b""
        if self._text:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out = (
                self._event(
                    "response.output_text.done",
                    item_id=self._msg,
                    output_index=0,
                    content_index=0,
                    text=text,
                    logprobs=[],
                )
                + self._event(
                    "response.content_part.done",
                    item_id=self._msg,
                    output_index=0,
                    content_index=0,
                    part=part,
                )
                + self._event("response.output_item.done", output_index=0, item=final["output"][0])
            )
        return out + self._event("response.completed", response=final), final

    def error(self, message: str) -> bytes:
        return self._event("error", code="server_error", message=message, param=None)


def input_items(inp: Any, rid: str) -> list[dict[str, Any]]:
    """`GET /v1/responses/{id}/input_items`: the input as message items with ids."""
    if isinstance(inp, str):
        content = [{"type": "input_text", "text": inp}]
        return [
            {
                "id": f"msg_in_{rid}_0",
                "type": "message",
                "role": "user",
                "status": "completed",
                "content": content,
            }
        ]
    items: list[dict[str, Any]] = []
    for i, item in enumerate(inp if isinstance(inp, list) else []):
        if isinstance(item, dict):
            items.append({"id": f"msg_in_{rid}_{i}", "type": "message", "status": "completed", **item})
    return items


# ------------------------------------------------------------------------------- legacy completions


class CompletionsSse:
    """`text_completion` chunks: no role chunk (the legacy API has none), usage chunk when asked."""

    __slots__ = ("_head", "include_usage")

    def __init__(self, cid: str, created: int, model: str, include_usage: bool) -> None:
        head = orjson.dumps({"id": cid, "object": "text_completion", "created": created, "model": model})
        self._head = b"data: " + head[:-1]
        self.include_usage = include_usage

    def opening(self) -> bytes:
        return b""

    def _choice(self, text: str, finish: str | None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return self._head + b',"choices":[' + orjson.dumps(choice) + b"]}\n\n"

    def content(self, text: str) -> bytes:
        return self._choice(text, None)

    def closing(self, reason: str, prompt: int, completion: int) -> list[bytes]:
        events = [self._choice("", reason)]
        if self.include_usage:
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            events.append(self._head + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n")
        return events

    @staticmethod
    def error(message: str) -> bytes:
        err = {"message": message, "type": "server_error", "param": None, "code": None}
        return b"data: " + orjson.dumps({"error": err}) + b"\n\n"


def completion_object(cid: str, model: str, text: str, reason: str, prompt: int, completion: int) -> bytes:
    return orjson.dumps(
        {
            "id": cid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )


# -------------------------------------------------------------------------------------- embeddings


def embedding_vector(model: str, text: str, dims: int) -> list[float]:
    """A deterministic unit vector for (model, input): same input, same vector, on every provider."""
    raw = b""
    counter = 0
    while len(raw) < 4 * dims:
        raw += hashlib.blake2b(f"{model}\0{counter}\0{text}".encode(), digest_size=64).digest()
        counter += 1
    ints = struct.unpack(f"<{dims}I", raw[: 4 * dims])
    vec = [x / 2**31 - 1.0 for x in ints]
    norm = sum(v * v for v in vec) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in vec]


def embedding_inputs(inp: Any) -> list[str]:
    """Each input as text (token arrays as their digits), in order; [] when the input is unusable."""
    if isinstance(inp, str):
        return [inp]
    if isinstance(inp, list) and inp and all(isinstance(t, int) for t in inp):
        return [" ".join(map(str, inp))]
    if isinstance(inp, list):
        return [x if isinstance(x, str) else " ".join(map(str, x)) for x in inp if isinstance(x, str | list)]
    return []


def embeddings_object(model: str, texts: list[str], dims: int, b64: bool, prompt_tokens: int) -> bytes:
    data = []
    for i, text in enumerate(texts):
        vec = embedding_vector(model, text, dims)
        emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage})
