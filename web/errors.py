"""Error responses: every failure becomes a short JSON body under ``/api`` or a plain page elsewhere.

One shape for the API, ``{"error": {"code", "message", "hint"}}`` (plus fields such as ``series`` where the
client can act on them), matching the job record's own error. Nothing a client sees ever holds a stack trace
or a debug page; unexpected exceptions are logged here (type, route and frames only: no request data, so no
patient data) and answered with a generic 500.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import redis
from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("openmsk.web")

# Codes for the HTTP errors Werkzeug raises itself (unknown route, wrong method, body too large...).
_HTTP_CODES = {
    400: ("BAD_REQUEST", "The request is malformed."),
    401: ("UNAUTHORIZED", "Sign in or send an API token."),
    403: ("FORBIDDEN", "This is not allowed."),
    404: ("NOT_FOUND", "There is nothing at this address."),
    405: ("METHOD_NOT_ALLOWED", "This address does not accept that method."),
    413: ("TOO_LARGE", "The request is larger than the node accepts."),
    415: ("UNSUPPORTED_MEDIA_TYPE", "The request body has the wrong type."),
    429: ("RATE_LIMITED", "Too many requests; wait a minute."),
}


class RequestError(Exception):
    """A request the node refuses, with what went wrong and what to do about it.

    ``extra`` holds machine-readable details a client can act on (e.g. the series to choose from).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        hint: str = "",
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint, **self.extra}}


def wants_json() -> bool:
    """API routes (and the pages' own scripts, which ask for JSON) get JSON; browsers get a page."""
    return request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"


def error_response(error: RequestError) -> Response:
    if wants_json():
        response = jsonify(error.body())
    else:
        response = Response(render_template("error.html", error=error), mimetype="text/html")
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def _from_http(exc: HTTPException) -> RequestError:
    status = exc.code or 500
    code, message = _HTTP_CODES.get(status, ("HTTP_ERROR", exc.name))
    hint = ""
    if status == 413:
        hint = "Send a smaller file (see OPENMSK_MAX_UPLOAD_MB)."
    return RequestError(status, code, message, hint)


def register_error_handlers(app: Flask) -> None:
    """JSON or page for every error; never Werkzeug's debug output or a traceback."""

    @app.errorhandler(RequestError)
    def _request_error(exc: RequestError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        response = error_response(_from_http(exc))
        if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(redis.RedisError)
    def _redis_error(exc: redis.RedisError) -> Response:
        log.error("Redis unavailable on %s %s: %s", request.method, request.url_rule, type(exc).__name__)
        return error_response(
            RequestError(
                503, "REDIS_UNAVAILABLE", "The node's job store is not reachable.", "Try again shortly."
            )
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # The frames go to the server log, the exception's message does not: it may quote request data.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unexpected %s on %s %s\n%s", type(exc).__name__, request.method, request.url_rule, frames)
        return error_response(
            RequestError(
                500,
                "INTERNAL_ERROR",
                "The node could not handle this request.",
                "Try again; if it persists, the node's log says why.",
            )
        )
