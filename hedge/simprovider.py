"""A simulated OpenAI-compatible provider: real HTTP on loopback, scripted latency and failures.

Used by the built-in demo (`hedge serve` without a config), by end-to-end tests and by the load-test
tool.  Two things matter more than features:

* **Precise, observable timing.**  Every request gets a `RequestRecord` with the moments its headers,
  first content token and end went out, and -- most important for a hedging proxy -- when the *client*
  went away.  The server runs with aiohttp's ``handler_cancellation=True`` so a dropped connection cancels
  the handler even while it sleeps before the first token or between tokens; the cancellation is stamped
  into ``disconnected_at`` at once.
* **Cheap CPU.**  The load test drives thousands of requests per second at it, so the server is a bare
  `aiohttp.web.Server` (no router, no access log) and SSE events are assembled from pre-serialised byte
  prefixes: one small ``orjson.dumps`` per content chunk and one ``resp.write`` per event.

Besides chat completions it speaks the Responses API (streaming and not, plus GET/DELETE/cancel/
input_items for the responses it created), legacy completions and embeddings, with the same `Behaviour`
timing and faults; the wire formats are in `simformats`. Each answer carries `X-Sim-Provider: <name>`.

Run providers as separate processes (so they do not share a CPU with the proxy under test)::

    python -m hedge.simprovider --name alpha --port 9001 --profile fast
    python -m hedge.simprovider --spec alpha:9001:fast --spec beta:9002:slow
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import math
import random
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .simformats import (
    CompletionsSse,
    ResponsesSse,
    completion_object,
    embedding_inputs,
    embeddings_object,
    input_items,
    prose_words,
    response_object,
    response_usage,
)

__all__ = [
    "DEFAULT_MODELS",
    "PROFILES",
    "Behaviour",
    "LatencyProfile",
    "RequestRecord",
    "SimProvider",
    "main",
]

DEFAULT_MODELS: tuple[str, ...] = ("gpt-5-mini", "gpt-4o-mini", "sim-small", "sim-large")

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_STORED_RESPONSES = 10_000  # responses kept for GET/DELETE/previous_response_id (oldest dropped)
EMBEDDING_DIMS = 16  # default vector size; a request's `dimensions` overrides it
_DONE = b"data: [DONE]\n\n"
_MALFORMED = b"data: {not json\n\n"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


# ---------------------------------------------------------------------------------------------------
# Behaviour: what one request does
# ---------------------------------------------------------------------------------------------------


@dataclass
class Behaviour:
    """What one request does. All times in seconds, measured from request arrival.

    Content chunk ``k`` (0-based) goes out at ``max(ttft, headers_delay) + k * token_gap`` plus
    ``stall_seconds`` once ``k >= stall_after_tokens``.  The ``*_after_tokens`` triggers fire after exactly
    N content chunks (N may equal the chunk count: then they fire before the finish chunk).

    Non-streaming requests answer once, when the last token would have been generated (the stream
    timeline above); a reset aborts the connection at token N, a malformed trigger answers 200 with a
    broken JSON body, an error-event trigger answers 500 with an OpenAI error JSON.

    ``gate`` (streams only): content chunk ``gate_before_token`` waits until the event is set, on top of
    its timeline. Tests use it to order events without wall-clock margins: a provider held at its gate
    cannot finish on its own, so only the proxy can end its request (and it ends it when it wants).

    The other APIs use the same timeline. A Responses stream sends response.created and
    response.in_progress with the headers (at ``headers_delay``, like chat's role chunk) and its first
    output_text delta at ``ttft``: a ``ttft`` well after ``headers_delay`` is a provider that answers at
    once but thinks for long. Embeddings answer whole at ``max(ttft, headers_delay)``; any trigger
    fires there.
    """

    status: int = 200
    error_body: bytes | None = None
    retry_after: float | None = None
    headers_delay: float = 0.0
    role_chunk_with_headers: bool = True
    ttft: float = 0.0
    token_gap: float = 0.0
    tokens: int = 5
    text: str | None = None
    reset_after_tokens: int | None = None
    malformed_after_tokens: int | None = None
    error_event_after_tokens: int | None = None
    stall_after_tokens: int | None = None
    stall_seconds: float = 0.0
    done: bool = True
    finish_reason: str = "stop"
    prompt_tokens: int = 10
    chunk_padding: int = 0
    gzip: bool = False
    gate: asyncio.Event | None = None
    gate_before_token: int = 0

    def token_time(self, k: int) -> float:
        """Offset from arrival of content chunk ``k``; one formula so stream and JSON answers agree."""
        t = max(self.ttft, self.headers_delay) + k * self.token_gap
        if self.stall_after_tokens is not None and k >= self.stall_after_tokens:
            t += self.stall_seconds
        return t

    def end_time(self, n: int) -> float:
        """Offset from arrival of the moment after ``n`` content chunks (a stall at N=n delays it)."""
        t = self.token_time(n - 1) if n > 0 else max(self.ttft, self.headers_delay)
        if self.stall_after_tokens is not None and self.stall_after_tokens == n:
            t += self.stall_seconds
        return t


@dataclass
class LatencyProfile:
    """A random `Behaviour` generator for demos and load tests.

    * TTFT is lognormal with median ``ttft_median`` and shape ``ttft_sigma`` (0 = constant).
    * With probability ``stall_prob`` the TTFT becomes ``stall_ttft`` instead: the heavy tail hedging
      exists to cut.
    * ``headers_delay`` is a **fraction** (0..1) of the sampled TTFT at which the response headers (and
      the role chunk) go out, so headers always precede the first token like at real providers.
      Error answers (``error_prob``) are sent at that same moment.
    * ``refuse`` makes the provider not listen at all (`SimProvider.start` binds, then refuses).
    """

    ttft_median: float = 0.1
    ttft_sigma: float = 0.3
    headers_delay: float = 0.3
    token_gap: float = 0.01
    tokens: int = 20
    stall_prob: float = 0.0
    stall_ttft: float = 2.0
    error_prob: float = 0.0
    error_status: int = 503
    refuse: bool = False

    def sample_ttft(self, rng: random.Random) -> float:
        """One TTFT draw (lognormal around the median)."""
        if self.ttft_median <= 0:
            return 0.0
        if self.ttft_sigma <= 0:
            return self.ttft_median
        return rng.lognormvariate(math.log(self.ttft_median), self.ttft_sigma)

    def sample(self, rng: random.Random) -> Behaviour:
        """Draw one request's behaviour; deterministic for a seeded ``rng``."""
        stalled = self.stall_prob > 0 and rng.random() < self.stall_prob
        ttft = self.stall_ttft if stalled else self.sample_ttft(rng)
        headers = ttft * min(max(self.headers_delay, 0.0), 1.0)
        if self.error_prob > 0 and rng.random() < self.error_prob:
            return Behaviour(status=self.error_status, headers_delay=headers)
        return Behaviour(headers_delay=headers, ttft=ttft, token_gap=self.token_gap, tokens=self.tokens)


PROFILES: dict[str, LatencyProfile] = {
    "instant": LatencyProfile(ttft_median=0.0, ttft_sigma=0.0, headers_delay=0.0, token_gap=0.0, tokens=20),
    "fast": LatencyProfile(ttft_median=0.040, ttft_sigma=0.25, token_gap=0.005),
    "medium": LatencyProfile(ttft_median=0.120, ttft_sigma=0.30, token_gap=0.010),
    "slow": LatencyProfile(ttft_median=0.400, ttft_sigma=0.30, token_gap=0.020),
    "stally": LatencyProfile(
        ttft_median=0.040, ttft_sigma=0.25, token_gap=0.005, stall_prob=0.05, stall_ttft=2.0
    ),
    "flaky": LatencyProfile(
        ttft_median=0.120, ttft_sigma=0.30, token_gap=0.010, error_prob=0.10, error_status=503
    ),
    "down": LatencyProfile(refuse=True),
}

BehaviourSource = Behaviour | LatencyProfile | Callable[["RequestRecord"], Behaviour]


@dataclass
class RequestRecord:
    """One chat request as the provider saw it; tests assert on these.

    ``finished_at`` is when *we* stopped (complete, reset, malformed or error end); ``disconnected_at``
    is when the *client* went away before that.  ``sent`` holds the body bytes exactly as written
    (for a gzip answer: the compressed bytes).
    """

    index: int
    arrived_at: float
    body: dict[str, Any]
    stream: bool
    headers_sent_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    disconnected_at: float | None = None
    completed: bool = False
    sent: bytearray = field(default_factory=bytearray, repr=False)
    api: str = "chat"  # chat | responses | completions | embeddings
    _ended: asyncio.Event | None = field(default=None, repr=False, compare=False)

    @property
    def ended(self) -> bool:
        """True once the handler is over, whichever side ended it."""
        return self.finished_at is not None or self.disconnected_at is not None


# ---------------------------------------------------------------------------------------------------
# Wire format
# ---------------------------------------------------------------------------------------------------


def error_json(message: str, status: int, code: str | None = None) -> bytes:
    """An OpenAI-style error body."""
    err = {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": None, "code": code}
    return orjson.dumps({"error": err})


class _Sse:
    """Pre-serialised pieces of one stream's events, so each chunk costs one tiny ``orjson.dumps``."""

    __slots__ = ("_head", "_pre", "_tail", "_usage_null", "include_usage")

    def __init__(self, cid: str, created: int, model: str, include_usage: bool) -> None:
        head = orjson.dumps(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
            }
        )[:-1]
        self.include_usage = include_usage
        self._head = b"data: " + head
        self._pre = self._head + b',"choices":[{"index":0,"delta":'
        self._usage_null = b',"usage":null' if include_usage else b""
        self._tail = b',"logprobs":null,"finish_reason":null}]' + self._usage_null + b"}\n\n"

    def role(self) -> bytes:
        return self._pre + b'{"role":"assistant","content":""}' + self._tail

    opening = role

    def closing(self, reason: str, prompt: int, completion: int) -> list[bytes]:
        """The finish chunk and, when asked for, the usage chunk: two events, two writes."""
        events = [self.finish(reason)]
        if self.include_usage:
            events.append(self.usage(prompt, completion))
        return events

    def content(self, text: str) -> bytes:
        return self._pre + b'{"content":' + orjson.dumps(text) + b"}" + self._tail

    def finish(self, reason: str) -> bytes:
        return (
            self._pre
            + b'{},"logprobs":null,"finish_reason":'
            + orjson.dumps(reason)
            + b"}]"
            + self._usage_null
            + b"}\n\n"
        )

    def usage(self, prompt: int, completion: int) -> bytes:
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        return self._head + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"

    @staticmethod
    def error(message: str) -> bytes:
        return b"data: " + error_json(message, 500) + b"\n\n"


_Encoder = _Sse | ResponsesSse | CompletionsSse
_APIS = {
    "/chat/completions": "chat",
    "/responses": "responses",
    "/completions": "completions",
    "/embeddings": "embeddings",
}


class _HeadersWithFirstWrite(web.StreamResponse):
    """A stream whose headers leave in the same transport write as the role chunk (one segment)."""

    _send_headers_immediately = False


class _TrackingServer(web.Server):
    """aiohttp's low-level server plus a live map of open client connections.

    aiohttp's own ``connections`` list drops a connection only after its handler task finishes; this map
    follows the TCP connection itself, which is what "the proxy released its connections" means.
    """

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.open_transports: dict[RequestHandler, asyncio.Transport] = {}

    def _make_request(
        self,
        message: Any,
        payload: Any,
        protocol: RequestHandler,
        writer: Any,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # Long-context prompts exceed aiohttp's 1 MiB default body limit; a provider must accept them.
        return web.BaseRequest(
            message, payload, protocol, writer, task, self._loop, client_max_size=MAX_BODY_BYTES
        )

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_transports[handler] = transport

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open_transports.pop(handler, None)


async def _sleep_until(deadline: float) -> None:
    """Sleep to an absolute ``time.monotonic()`` deadline; no yield at all when it has passed."""
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


# ---------------------------------------------------------------------------------------------------
# The provider
# ---------------------------------------------------------------------------------------------------


class SimProvider:
    """A scripted OpenAI-compatible HTTP server on loopback.

    ``behaviour`` may be swapped at any time; it is read once per request.  It is a fixed `Behaviour`,
    a `LatencyProfile` (sampled with this provider's seeded RNG) or a callable given the new
    `RequestRecord` (index, body) that returns a `Behaviour`.
    """

    def __init__(
        self,
        name: str,
        behaviour: BehaviourSource | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
        keep_records: bool = True,
        models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
        prose: bool = False,
    ) -> None:
        self.name = name
        self.behaviour: BehaviourSource = Behaviour() if behaviour is None else behaviour
        self.host = host
        self.port = port
        self.keep_records = keep_records
        self.models = list(models)
        # prose=True: generated answers are short sentences (the demo); False: `name#request:word`
        # pieces, which tests use to tell whose bytes arrived
        self.prose = prose
        self.stored: OrderedDict[str, dict[str, Any]] = OrderedDict()  # Responses it created, by id
        self._stored_inputs: dict[str, Any] = {}
        self._background: dict[str, asyncio.Task[None]] = {}
        self.records: list[RequestRecord] = []
        self.requests_total = 0
        self.disconnects_total = 0
        self.completed_total = 0
        self._rng = random.Random(seed)
        self._server: _TrackingServer | None = None
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None
        self._inflight: dict[int, RequestRecord] = {}
        self._created = int(time.time())

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and listen (port 0 = ephemeral; ``.port`` is set to the real one)."""
        self._server = _TrackingServer(self._handle, handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(self._server, shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen()
        if isinstance(self.behaviour, LatencyProfile) and self.behaviour.refuse:
            await self.refuse()

    async def stop(self) -> None:
        """Close the listener and every open connection at once (handlers are cancelled, not awaited)."""
        if self._runner is None:
            return
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._abort_connections()
        for task in self._background.values():
            task.cancel()
        self._background.clear()
        await self._runner.cleanup()
        self._runner = None
        self._server = None

    async def refuse(self, *, drop_connections: bool = False) -> None:
        """Stop listening: new connections are refused.  Open ones keep going unless told to drop."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if drop_connections:
            self._abort_connections()

    async def resume(self) -> None:
        """Listen again on the same port."""
        if self._runner is None:
            raise RuntimeError("provider not started")
        if self._site is None:
            await self._listen()

    async def __aenter__(self) -> SimProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _listen(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024, reuse_address=True)
        await site.start()
        self._site = site
        if self.port == 0:
            self.port = self._runner.addresses[0][1]

    def _abort_connections(self) -> None:
        """Drop every connection (RST).  The requests in flight end by *our* doing, so they are stamped
        ``finished_at`` now, before their cancelled handlers could mistake this for a client disconnect."""
        if self._server is None:
            return
        now = time.monotonic()
        for record in self._inflight.values():
            if not record.ended:
                record.finished_at = now
        for transport in list(self._server.open_transports.values()):
            transport.abort()

    # -- introspection ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def listening(self) -> bool:
        return self._site is not None

    def open_connections(self) -> int:
        """Number of client TCP connections open right now."""
        return 0 if self._server is None else len(self._server.open_transports)

    async def wait_disconnected(self, record: RequestRecord, timeout: float = 1.0) -> float | None:  # noqa: ASYNC109 - spec API
        """Wait until ``record``'s handler is over; return ``disconnected_at`` (None if we finished it).

        Raises `TimeoutError` if the request is still being served after ``timeout`` seconds.
        """
        if not record.ended:
            if record._ended is None:
                record._ended = asyncio.Event()
            await asyncio.wait_for(record._ended.wait(), timeout)
        return record.disconnected_at

    async def wait_requests(self, n: int, timeout: float = 1.0) -> None:  # noqa: ASYNC109 - test helper
        """Wait until at least ``n`` generation requests (any API) have arrived (polls; meant for tests)."""
        deadline = time.monotonic() + timeout
        while self.requests_total < n:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name}: {self.requests_total} of {n} requests arrived")
            await asyncio.sleep(0.002)

    # -- request handling ---------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path.rstrip("/").removeprefix("/v1")
        api = _APIS.get(path)
        if api is not None:
            if request.method != "POST":
                return _error_response(405, "use POST")
            return await self._generate(request, api)
        if path == "/models" and request.method == "GET":
            return self._models_response()
        if path.startswith("/responses/"):
            return await self._response_state(request, path.split("/")[2:])
        return _error_response(404, f"no route {request.method} {request.path}")

    async def _response_state(self, request: web.BaseRequest, parts: list[str]) -> web.Response:
        """GET/DELETE /v1/responses/{id}, POST .../cancel, GET .../input_items: only for our own ids."""
        rid, rest = parts[0], "/".join(parts[1:])
        obj = self.stored.get(rid)
        if obj is None:
            return _error_response(404, f"No response found with id '{rid}'.")
        method = request.method
        if rest == "" and method == "GET":
            return _json_response(obj, self.name)
        if rest == "" and method == "DELETE":
            del self.stored[rid]
            self._stored_inputs.pop(rid, None)
            return _json_response({"id": rid, "object": "response", "deleted": True}, self.name)
        if rest == "cancel" and method == "POST":
            if not obj.get("background"):
                return _error_response(400, "Only responses created with background=true can be cancelled.")
            task = self._background.pop(rid, None)
            if task is not None:
                task.cancel()
                obj["status"] = "cancelled"
            return _json_response(obj, self.name)
        if rest == "input_items" and method == "GET":
            data = input_items(self._stored_inputs.get(rid), rid)
            page = {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": False,
            }
            return _json_response(page, self.name)
        return _error_response(405 if rest in ("", "cancel", "input_items") else 404, "not allowed here")

    def _store(self, rid: str, obj: dict[str, Any], inp: Any) -> None:
        self.stored[rid] = obj
        self._stored_inputs[rid] = inp
        while len(self.stored) > MAX_STORED_RESPONSES:
            old, _ = self.stored.popitem(last=False)
            self._stored_inputs.pop(old, None)

    def _models_response(self) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": self._created, "owned_by": self.name} for m in self.models
        ]
        return web.Response(
            body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
        )

    def _behaviour_for(self, record: RequestRecord) -> Behaviour:
        source = self.behaviour
        if isinstance(source, Behaviour):
            return source
        if isinstance(source, LatencyProfile):
            return source.sample(self._rng)
        return source(record)

    async def _generate(self, request: web.BaseRequest, api: str) -> web.StreamResponse:
        arrived = time.monotonic()
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error_response(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error_response(400, "request body must be a JSON object")
        stream = body.get("stream") is True and api != "embeddings"
        record = RequestRecord(self.requests_total, arrived, body, stream, api=api)
        self.requests_total += 1
        if self.keep_records:
            self.records.append(record)
        self._inflight[record.index] = record
        try:
            behaviour = self._behaviour_for(record)
            if behaviour.status != 200:
                return await self._send_error(request, record, behaviour)
            prev = body.get("previous_response_id") if api == "responses" else None
            if prev is not None and prev not in self.stored:
                resp = _error_response(
                    404, f"Previous response with id '{prev}' not found.", "previous_response_id",
                    "previous_response_not_found",
                )  # fmt: skip
                return await self._send_whole(request, record, resp, complete=False)
            if api == "embeddings":
                return await self._send_embeddings(request, record, behaviour)
            if api == "responses" and body.get("background") is True and not record.stream:
                return await self._start_background(request, record, behaviour)
            if record.stream:
                return await self._send_stream(request, record, behaviour)
            return await self._send_json(request, record, behaviour)
        except asyncio.CancelledError:
            self._client_gone(record)
            raise
        finally:
            del self._inflight[record.index]
            if record._ended is not None:
                record._ended.set()

    def _client_gone(self, record: RequestRecord) -> None:
        """Stamp the moment the client left (unless the request had already ended on our side)."""
        if record.ended:
            return
        record.disconnected_at = time.monotonic()
        self.disconnects_total += 1

    def _finished(self, record: RequestRecord, completed: bool) -> None:
        record.finished_at = time.monotonic()
        if completed:
            record.completed = True
            self.completed_total += 1

    def _words(self, record: RequestRecord, b: Behaviour) -> list[str]:
        """Content pieces; generated ones name provider and request so no two streams look alike."""
        if b.text is not None:
            words = [w + " " for w in b.text.split()]
        elif self.prose:
            words = prose_words(f"{self.name}/{record.index}", b.tokens)
        else:
            words = [f"{self.name}#{record.index}:{i} " for i in range(b.tokens)]
        if b.chunk_padding > 0:
            pad = "x" * b.chunk_padding
            words = [w + pad for w in words]
        return words

    def _ids(self, record: RequestRecord) -> tuple[str, str]:
        model = record.body.get("model")
        prefix = {"chat": "chatcmpl-", "responses": "resp_", "completions": "cmpl-"}.get(record.api, "emb-")
        tag = "".join(ch for ch in self.name if ch.isalnum())
        return f"{prefix}sim{tag}{record.index}", model if isinstance(model, str) else "sim-model"

    async def _write(self, resp: web.StreamResponse, record: RequestRecord, data: bytes) -> None:
        """One event, one write; bytes are recorded only once the write was accepted."""
        await resp.write(data)
        if self.keep_records:
            record.sent += data

    async def _send_error(
        self, request: web.BaseRequest, record: RequestRecord, b: Behaviour
    ) -> web.StreamResponse:
        await _sleep_until(record.arrived_at + b.headers_delay)
        if b.error_body is None:
            resp = _error_response(b.status, f"simulated {b.status} from provider {self.name}")
        else:
            resp = web.Response(status=b.status, body=b.error_body, content_type="text/plain")
        if b.retry_after is not None:
            resp.headers["Retry-After"] = f"{b.retry_after:g}"
        return await self._send_whole(request, record, resp)

    async def _send_whole(
        self, request: web.BaseRequest, record: RequestRecord, resp: web.Response, complete: bool = True
    ) -> web.Response:
        """Send a whole (non-streaming) answer ourselves, so a failed write is seen and recorded.

        ``complete`` is False for a deliberately broken answer (malformed body, mid-generation error).
        """
        body = resp.body
        assert isinstance(body, bytes)
        try:
            record.headers_sent_at = time.monotonic()
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionResetError:
            self._client_gone(record)
            return resp
        if self.keep_records:
            record.sent += body
        self._finished(record, completed=complete)
        return resp

    async def _send_json(
        self, request: web.BaseRequest, record: RequestRecord, b: Behaviour
    ) -> web.StreamResponse:
        words = self._words(record, b)
        n = len(words)
        cut, kind = _first_trigger(b, n)
        t0 = record.arrived_at
        if kind is not None:
            await _sleep_until(t0 + (b.token_time(cut - 1) if cut > 0 else b.headers_delay))
            if kind == "reset":
                return self._abort(request, record)
            if kind == "malformed":
                resp = web.Response(body=b"{not json", content_type="application/json")
            else:
                resp = _error_response(500, f"simulated mid-generation error from provider {self.name}")
            return await self._send_whole(request, record, resp, complete=False)
        await _sleep_until(t0 + b.end_time(n))
        cid, model = self._ids(record)
        if record.api == "responses":
            obj = self._response(
                record, cid, model, "completed", "".join(words), response_usage(b.prompt_tokens, n)
            )
            body = orjson.dumps(obj)
        elif record.api == "completions":
            body = completion_object(cid, model, "".join(words), b.finish_reason, b.prompt_tokens, n)
        else:
            body = self._chat_object(cid, model, words, b)
        resp = web.Response(
            body=gzip.compress(body, 1, mtime=0) if b.gzip else body, content_type="application/json"
        )
        resp.headers["X-Sim-Provider"] = self.name
        if b.gzip:
            resp.headers["Content-Encoding"] = "gzip"
        record.first_token_at = time.monotonic()
        return await self._send_whole(request, record, resp)

    def _response(
        self, record: RequestRecord, rid: str, model: str, status: str, text: str | None, usage: Any
    ) -> dict[str, Any]:
        """A Responses object for `record`, stored (unless store=false) for the state endpoints."""
        body = record.body
        prev = body.get("previous_response_id")
        obj = response_object(
            rid, model, status, created_at=int(record.arrived_at), text=text, usage=usage,
            previous_response_id=prev if isinstance(prev, str) else None,
            background=body.get("background") is True, msg_id="msg_" + rid.removeprefix("resp_"),
        )  # fmt: skip
        if body.get("store") is not False:
            self._store(rid, obj, body.get("input"))
        return obj

    async def _start_background(
        self, request: web.BaseRequest, record: RequestRecord, b: Behaviour
    ) -> web.StreamResponse:
        """background=true: answer `queued` at once; the response completes later, unless cancelled."""
        await _sleep_until(record.arrived_at + b.headers_delay)
        rid, model = self._ids(record)
        obj = self._response(record, rid, model, "queued", None, None)
        obj["background"] = True
        words = self._words(record, b)

        async def finish() -> None:
            await _sleep_until(record.arrived_at + b.end_time(len(words)))
            done = self._response(
                record, rid, model, "completed", "".join(words), response_usage(b.prompt_tokens, len(words))
            )
            done["background"] = True
            self._background.pop(rid, None)

        self._background[rid] = asyncio.get_running_loop().create_task(finish())
        resp = web.Response(body=orjson.dumps(obj), content_type="application/json")
        resp.headers["X-Sim-Provider"] = self.name
        return await self._send_whole(request, record, resp)

    async def _send_embeddings(
        self, request: web.BaseRequest, record: RequestRecord, b: Behaviour
    ) -> web.StreamResponse:
        body = record.body
        await _sleep_until(record.arrived_at + b.end_time(0))
        if b.reset_after_tokens is not None:
            return self._abort(request, record)
        if b.malformed_after_tokens is not None:
            resp = web.Response(
                body=b'{"object": "list", "data": [{"embedding": [0.1,', content_type="application/json"
            )
            return await self._send_whole(request, record, resp, complete=False)
        if b.error_event_after_tokens is not None:
            resp = _error_response(500, f"simulated embeddings error from provider {self.name}")
            return await self._send_whole(request, record, resp, complete=False)
        texts = embedding_inputs(body.get("input"))
        if not texts:
            return await self._send_whole(
                request, record, _error_response(400, "'input' is missing or invalid")
            )
        dims = body.get("dimensions")
        dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else EMBEDDING_DIMS
        _, model = self._ids(record)
        payload = embeddings_object(
            model, texts, dims, body.get("encoding_format") == "base64", b.prompt_tokens * len(texts)
        )
        resp = web.Response(body=payload, content_type="application/json")
        resp.headers["X-Sim-Provider"] = self.name
        record.first_token_at = time.monotonic()
        return await self._send_whole(request, record, resp)

    @staticmethod
    def _chat_object(cid: str, model: str, words: list[str], b: Behaviour) -> bytes:
        return orjson.dumps(
            {
                "id": cid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(words), "refusal": None},
                        "logprobs": None,
                        "finish_reason": b.finish_reason,
                    }
                ],
                "usage": _usage(b.prompt_tokens, len(words)),
                "system_fingerprint": None,
            }
        )

    def _abort(self, request: web.BaseRequest, record: RequestRecord) -> web.StreamResponse:
        """Kill the TCP connection (RST); aiohttp's later attempt to finish the response fails quietly."""
        if request.transport is not None:
            request.transport.abort()
        self._finished(record, completed=False)
        return web.Response()

    async def _send_stream(
        self, request: web.BaseRequest, record: RequestRecord, b: Behaviour
    ) -> web.StreamResponse:
        words = self._words(record, b)
        cid, model = self._ids(record)
        opts = record.body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        sse: _Encoder
        if record.api == "responses":
            prev = record.body.get("previous_response_id")
            background = record.body.get("background") is True
            sse = ResponsesSse(cid, model, prev if isinstance(prev, str) else None, background)
        elif record.api == "completions":
            sse = CompletionsSse(cid, int(time.time()), model, include_usage)
        else:
            sse = _Sse(cid, int(time.time()), model, include_usage)
        with_first = b.role_chunk_with_headers and record.api != "completions"  # no role chunk there
        resp = _HeadersWithFirstWrite() if with_first else web.StreamResponse()
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Sim-Provider"] = self.name
        try:
            await self._stream_events(request, record, b, resp, sse, words)
        except ConnectionResetError:
            self._client_gone(record)
        return resp

    async def _stream_events(
        self,
        request: web.BaseRequest,
        record: RequestRecord,
        b: Behaviour,
        resp: web.StreamResponse,
        sse: _Encoder,
        words: list[str],
    ) -> None:
        t0 = record.arrived_at
        await _sleep_until(t0 + b.headers_delay)
        await resp.prepare(request)
        opening = sse.opening()
        role_sent = b.role_chunk_with_headers or not opening
        if role_sent and opening:
            await self._write(resp, record, opening)
        record.headers_sent_at = time.monotonic()
        n = len(words)
        for i in range(n + 1):
            if i == b.reset_after_tokens:
                self._abort(request, record)
                return
            if i == b.malformed_after_tokens:
                await self._write(resp, record, _MALFORMED)
                resp.force_close()
                await resp.write_eof()
                self._finished(record, completed=False)
                return
            if i == b.error_event_after_tokens:
                await self._write(
                    resp, record, sse.error(f"simulated stream error from provider {self.name}")
                )
                await resp.write_eof()
                self._finished(record, completed=False)
                return
            if i == n:
                break
            if b.gate is not None and i == b.gate_before_token:
                await b.gate.wait()
            await _sleep_until(t0 + b.token_time(i))
            if not role_sent:
                await self._write(resp, record, opening)
                role_sent = True
            await self._write(resp, record, sse.content(words[i]))
            if i == 0:
                record.first_token_at = time.monotonic()
        await _sleep_until(t0 + b.end_time(n))
        if not role_sent:
            await self._write(resp, record, opening)
        if isinstance(sse, ResponsesSse):
            tail, final = sse.closing(b.prompt_tokens)
            if record.body.get("store") is not False:
                self._store(sse.rid, final, record.body.get("input"))
            await self._write(resp, record, tail)
        else:
            for event in sse.closing(b.finish_reason, b.prompt_tokens, n):
                await self._write(resp, record, event)
        if b.done and not isinstance(sse, ResponsesSse):  # the Responses API has no [DONE]
            await self._write(resp, record, _DONE)
        await resp.write_eof()
        self._finished(record, completed=True)


def _first_trigger(b: Behaviour, n: int) -> tuple[int, str | None]:
    """The earliest of reset / malformed / error-event within ``n`` tokens (reset wins ties)."""
    best: tuple[int, str | None] = (n + 1, None)
    for after, kind in (
        (b.reset_after_tokens, "reset"),
        (b.malformed_after_tokens, "malformed"),
        (b.error_event_after_tokens, "error"),
    ):
        if after is not None and after <= n and after < best[0]:
            best = (after, kind)
    return best


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> web.Response:
    err = {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}
    return web.Response(status=status, body=orjson.dumps({"error": err}), content_type="application/json")


def _json_response(obj: Any, provider: str) -> web.Response:
    resp = web.Response(body=orjson.dumps(obj), content_type="application/json")
    resp.headers["X-Sim-Provider"] = provider
    return resp


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _parse_spec(spec: str, default_profile: str) -> tuple[str, int, str]:
    """``name:port[:profile]`` -> (name, port, profile)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"bad --spec {spec!r}; want NAME:PORT[:PROFILE]")
    profile = parts[2] if len(parts) == 3 else default_profile
    if profile not in PROFILES:
        raise argparse.ArgumentTypeError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    return parts[0], int(parts[1]), profile


def _arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hedge.simprovider", description="Run simulated OpenAI-compatible providers."
    )
    p.add_argument(
        "--name", default="sim", help="provider name (in the X-Sim-Provider header, and in tagged text)"
    )
    p.add_argument(
        "--prose", action="store_true", help="generate short sentences instead of `name#request:word` pieces"
    )
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--profile", default="fast", choices=sorted(PROFILES))
    p.add_argument("--seed", type=int, default=None, help="RNG seed (each --spec gets seed+i)")
    p.add_argument(
        "--spec",
        action="append",
        default=[],
        metavar="NAME:PORT[:PROFILE]",
        help="run several providers in this process (repeatable; overrides --name/--port)",
    )
    return p


async def _serve(specs: list[tuple[str, int, str]], host: str, seed: int | None, prose: bool = False) -> None:
    providers = [
        SimProvider(
            name,
            PROFILES[profile],
            host=host,
            port=port,
            seed=None if seed is None else seed + i,
            keep_records=False,
            prose=prose,
        )
        for i, (name, port, profile) in enumerate(specs)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for p, (_, _, profile) in zip(providers, specs, strict=True):
            await p.start()
            state = "refusing" if not p.listening else "listening"
            print(f"simprovider {p.name} {state} on {p.base_url} profile={profile}", flush=True)
        await stop.wait()
    finally:
        for p in providers:
            await p.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run until SIGINT/SIGTERM, exit 0."""
    parser = _arg_parser()
    args = parser.parse_args(argv)
    try:
        specs = [_parse_spec(s, args.profile) for s in args.spec] or [(args.name, args.port, args.profile)]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    import uvloop

    uvloop.run(_serve(specs, args.host, args.seed, prose=args.prose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
