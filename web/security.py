"""Response hardening and rate limits.

Every response gets security headers: a strict Content-Security-Policy (the pages load only their own
scripts, styles and images, so an injected tag can do nothing), no framing, no MIME sniffing, no referrer
leaving the node, and ``no-store`` on everything but static files (job pages and results hold patient data).

Rate limits count in Redis (fixed one-minute windows), so every web process of a node shares them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from flask import Flask, Response, request

from web.errors import RequestError

CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
RATE_PREFIX = "openmsk:ratelimit:"


def register_security_headers(app: Flask, *, hsts: bool) -> None:
    """Add :data:`HEADERS` (and HSTS when served over HTTPS) to every response."""

    @app.after_request
    def _headers(response: Response) -> Response:
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if hsts:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        if request.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "public, max-age=3600")
        else:
            response.headers["Cache-Control"] = "no-store"
        return response


def check_rate(
    client: redis.Redis,
    action: str,
    who: str,
    limit: int,
    window_s: int = 60,
    clock: Callable[[], float] = time.time,
) -> None:
    """Count one ``action`` by ``who``; raise HTTP 429 (with ``Retry-After``) past ``limit`` per window.

    Fixed windows of ``window_s`` seconds on ``clock`` (wall time; tests pass their own).
    """
    now = int(clock())
    window = now // window_s
    key = f"{RATE_PREFIX}{action}:{who}:{window}"
    with client.pipeline() as pipe:
        pipe.incr(key)
        pipe.expire(key, window_s * 2)
        count, _ = pipe.execute()
    if count > limit:
        retry = window_s - now % window_s
        raise RequestError(
            429,
            "RATE_LIMITED",
            f"More than {limit} {action}s in a minute from this client.",
            f"Wait {retry} s and try again.",
            headers={"Retry-After": str(retry)},
        )
