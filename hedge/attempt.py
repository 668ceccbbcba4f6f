"""One upstream attempt: open the call and read it until its first token (or its whole JSON body).

An attempt is the unit the race launches and cancels (docs/design.md, "The request path"). It ends in
exactly one `AttemptResult`: a first token (the open response and the bytes read so far, handed over to
whoever commits it) or a `Failure` the race can classify. It never raises but `CancelledError`, and it
closes its connection on every path except the hand-over, so cancelling its task is all it takes to stop
a provider generating.

What counts as a first token is the request's dialect's business (`hedge/dialects.py`); how a non-200
answer is classified is `classify_status` below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .apisupport import ApiSupport
from .catalog import Candidate
from .dialects import TOKEN, Dialect, StreamDetector, StreamError, parse_json_body
from .race import Failure, FailureKind
from .upstream import Response, UpstreamClient, UpstreamError

ERROR_BODY_LIMIT = 64 * 1024  # how much of a provider's error answer we read
RESPONSE_LIMIT = 64 * 1024 * 1024  # the largest JSON answer we take
LACKS_API = "lacks_api"  # the failure reason of an attempt whose provider has no such path (404/405)


@dataclass(slots=True)
class Call:
    """One request to race, whatever its API: everything an attempt and the race need to know of it."""

    dialect: Dialect
    body: dict[str, Any]
    stream: bool
    strip_usage: bool  # a chat-like stream: we ask for the usage event, and cut it out again
    wasted_tokens: int  # the prompt estimate a cancelled attempt is billed for
    pinned: bool = False  # state at one provider: one attempt, no hedge (Responses continuation/background)

    @property
    def api(self) -> str:
        return self.dialect.name

    def upstream_body(self) -> dict[str, Any]:
        """The body every attempt sends (with its own model id): for a stream whose usage the caller did
        not ask for, we ask for it anyway (the cost needs it) and strip the usage event again."""
        if not self.strip_usage:
            return self.body
        body = dict(self.body)
        so = dict(body.get("stream_options") or {})
        so["include_usage"] = True
        body["stream_options"] = so
        return body


@dataclass(slots=True)
class AttemptResult:
    """What an attempt task returns: a first token (resp + bytes so far) or a failure."""

    failure: Failure | None = None
    resp: Response | None = None
    chunks: list[bytes] | None = None
    parsed: dict[str, Any] | None = None  # non-streaming body
    error_body: bytes = b""
    first_at: float = 0.0


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    v = headers.get("Retry-After")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        return None  # an HTTP-date: rare from LLM APIs; the breaker's own backoff applies


def classify_status(status: int, headers: Mapping[str, str]) -> Failure:
    """408/409/429/5xx (and 401/403/404: *our* provider key or model id is wrong, not the caller's
    request) try the next candidate; other 4xx are the caller's fault and are returned as they are."""
    reason = f"http_{status}"
    if status in (401, 403, 404, 408, 409, 429) or status >= 500 or status < 400:
        return Failure(FailureKind.RETRYABLE, reason, status, retry_after_seconds(headers))
    return Failure(FailureKind.CALLER, reason, status)


def for_health(f: Failure) -> Failure:
    """What the feedback hears of a failure: a provider without the path is not unhealthy (its breaker
    must not open for chat because it has no /v1/responses), so that counts like a caller's error."""
    return Failure(FailureKind.CALLER, f.reason, f.status) if f.reason == LACKS_API else f


class Attempts:
    """Runs attempts against the configured providers: their URLs and headers are built once, here."""

    __slots__ = ("api_support", "clock", "headers", "inflight", "upstream", "urls")

    def __init__(
        self,
        upstream: UpstreamClient,
        urls: Mapping[tuple[str, str], str],
        headers: Mapping[str, Mapping[str, str]],
        api_support: ApiSupport,
        clock: Callable[[], float],
        inflight: Callable[[str], Any],
    ) -> None:
        self.upstream = upstream
        self.urls = urls  # (provider, api) -> URL
        self.headers = headers  # provider -> request headers (with its key)
        self.api_support = api_support
        self.clock = clock
        self.inflight = inflight  # provider -> its in-flight attempts gauge

    async def run(self, c: Candidate, payload: bytes, call: Call) -> AttemptResult:
        """Open one upstream call and read it until its first token (or its full body). Never raises
        except CancelledError; always closes its connection unless it hands it over as the winner."""
        t = c.provider.timeouts
        resp: Response | None = None
        handed_over = False
        gauge = self.inflight(c.provider.name)
        gauge.inc()
        try:
            async with asyncio.timeout(t.first_token):
                resp = await self.upstream.open(
                    self.urls[c.provider.name, call.api], self.headers[c.provider.name], payload,
                    connect_timeout=t.connect, read_timeout=t.idle,
                )  # fmt: skip
                if resp.status != 200:
                    err = await resp.read_all(ERROR_BODY_LIMIT)
                    return AttemptResult(failure=self._failure(c, call, resp, err), error_body=err)
                if call.stream:
                    det = StreamDetector(call.dialect)
                    chunks: list[bytes] = []
                    while True:
                        chunk = await resp.read_chunk()
                        if not chunk:
                            raise StreamError("upstream stream ended before any token")
                        chunks.append(chunk)
                        if det.feed(chunk) == TOKEN:
                            break
                    handed_over = True
                    return AttemptResult(resp=resp, chunks=chunks, first_at=self.clock())
                body = await resp.read_all(RESPONSE_LIMIT)
                parsed = parse_json_body(body, call.dialect)  # only a complete, valid body wins
                resp.release()
                handed_over = True  # back in the pool: not ours to abort any more
                return AttemptResult(chunks=[body], parsed=parsed, first_at=self.clock())
        except TimeoutError:
            return AttemptResult(failure=Failure(FailureKind.RETRYABLE, "timeout"))
        except UpstreamError as e:
            return AttemptResult(failure=Failure(FailureKind.RETRYABLE, e.reason))
        except StreamError as e:
            return AttemptResult(failure=Failure(FailureKind.RETRYABLE, e.reason, 200))
        finally:
            gauge.dec()
            if resp is not None and not handed_over:
                resp.abort()

    def _failure(self, c: Candidate, call: Call, resp: Response, err: bytes) -> Failure:
        failure = classify_status(resp.status, resp.headers)
        if resp.status in (404, 405):
            if self.api_support.observe(c.provider.name, call.api, resp.status, err):
                # no such path there: skipped for a while, and this request fails over
                return Failure(FailureKind.RETRYABLE, LACKS_API, resp.status)
            if call.pinned:
                # the owner does not know the parent (expired, deleted): the caller's answer
                return Failure(FailureKind.CALLER, failure.reason, resp.status)
        return failure
