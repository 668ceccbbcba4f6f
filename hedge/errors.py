"""Errors as domain values: what went wrong, never how it is sent.

Nothing here imports aiohttp. Core modules raise `ApiError` (a plain exception holding the status,
message, type, code, param and headers the caller should see) or `NoCandidates` (the feedback loop's own
"nobody can take this request now", which knows no HTTP); `hedge/http_errors.py` turns both into aiohttp
responses at the edge, in one function. See docs/design.md, "Errors".

Every error the proxy returns has the shape `{"error": {"message", "type", "param", "code"}}`, so that
OpenAI SDKs raise the right exception class and show the message. Messages never contain provider keys:
they are built from our own words and upstream *status codes*, not from upstream bodies we did not check.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

# HTTP status -> OpenAI error "type"
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """Raised anywhere in request handling; the edge (`http_errors.error_response`) turns it into error
    JSON with this status. A plain value: building it does no I/O and needs no web framework."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


class NoCandidates(Exception):
    """Every candidate of a model is cooling down (its breaker is open): nobody may be raced now.

    Raised by `Feedback.order`, which decides *that* no candidate is available and *when* the first one
    will be again, but not what a caller is told: `as_api_error` says that (a 503 with Retry-After).
    """

    def __init__(self, model: str, retry_after_s: float) -> None:
        super().__init__(f"every candidate of {model!r} is cooling down")
        self.model = model
        self.retry_after_s = retry_after_s

    def as_api_error(self) -> ApiError:
        return ApiError(
            503,
            f"Every provider for '{self.model}' is cooling down after repeated failures; retry shortly.",
            code="providers_unavailable",
            headers={"Retry-After": str(max(1, round(self.retry_after_s)))},
        )


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def sse_error_event(message: str, type: str = "upstream_error", code: str | None = None) -> bytes:
    """The event that ends a committed stream whose provider failed (docs/design.md, "The request path").

    OpenAI's SDKs raise an APIError when an SSE event carries an `error` object, so clients learn the
    stream is incomplete instead of mistaking a truncated answer for a full one.
    """
    return b"data: " + error_body(message, type, None, code) + b"\n\n"
