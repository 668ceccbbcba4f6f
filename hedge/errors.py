"""OpenAI-style error bodies.

Every error the proxy returns has the shape `{"error": {"message", "type", "param", "code"}}`, so that
OpenAI SDKs raise the right exception class and show the message. Messages never contain provider keys:
they are built from our own words and upstream *status codes*, not from upstream bodies we did not check.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

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
    """Raised anywhere in request handling; the server turns it into error JSON with this status."""

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

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.body(), content_type="application/json", headers=self.headers
        )


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def sse_error_event(message: str, type: str = "upstream_error", code: str | None = None) -> bytes:
    """The event that ends a committed stream whose provider failed (DESIGN §1.6).

    OpenAI's SDKs raise an APIError when an SSE event carries an `error` object, so clients learn the
    stream is incomplete instead of mistaking a truncated answer for a full one.
    """
    return b"data: " + error_body(message, type, None, code) + b"\n\n"
