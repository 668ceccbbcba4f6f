"""The edge's one translation from domain errors to HTTP: `error_response`.

The core raises plain values (`errors.ApiError`, `errors.NoCandidates`) and imports no web framework;
this is the only function that turns them into aiohttp responses, so the JSON shape, the content type
and the headers of every error answer are decided in one place (docs/design.md, "Errors").
"""

from __future__ import annotations

from aiohttp import web

from .errors import ApiError, NoCandidates


def error_response(err: ApiError | NoCandidates) -> web.Response:
    """OpenAI error JSON for a domain error, with its status and headers (e.g. Retry-After)."""
    if isinstance(err, NoCandidates):
        err = err.as_api_error()
    return web.Response(
        status=err.status, body=err.body(), content_type="application/json", headers=err.headers
    )
