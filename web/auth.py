"""Who may use the web: API bearer tokens, sign-in for the pages, the session cookie and CSRF tokens.

The scheme, as the README documents it:

- **API**: ``Authorization: Bearer <token>`` with a token from ``OPENMSK_API_TOKENS``; when that is empty,
  the token the node generated once under ``DATA_DIR/secrets/api_token`` (:func:`ensure_api_token`, called
  by ``openmsk up`` and ``openmsk web``). ``/health`` and ``/metrics`` stay open for scrapers.
- **Pages**: sign in with a user of ``OPENMSK_WEB_USERS`` (``user:hash`` pairs, hashes from
  ``openmsk web --hash-password``), or leave the user empty and give an API token as the password.
- **Session**: Flask's signed cookie (key from ``OPENMSK_SECRET_KEY``, else generated under
  ``DATA_DIR/secrets``), ``HttpOnly``, ``SameSite=Lax``, ``Secure`` when ``OPENMSK_WEB_SECURE_COOKIES``. A
  session remembers which user or which token (by digest) signed in and is refused once that user or token
  is no longer configured.
- **CSRF**: every session carries a random token; a state-changing request authenticated by the cookie
  must send it back (form field ``csrf_token`` or header ``X-CSRF-Token``). Bearer requests carry no
  ambient credentials and need none. The sign-in and sign-out forms check it themselves too, whatever their
  encoding (a cross-site multipart form must not sign a browser in as somebody else).
- **Audit**: every sign-in (succeeded or failed: then only the address, never the name typed) and sign-out
  is a line of the audit trail (:mod:`openmsk.audit`); so is a wrong API token, once per address and minute.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from urllib.parse import urlsplit

import redis
from flask import Flask, current_app, g, request, session
from werkzeug.security import check_password_hash, generate_password_hash

from openmsk import audit
from openmsk.config import ConfigError, Settings, env_name
from openmsk.stored_secrets import API_TOKEN, WEB_SECRET_KEY, secret_path, stored_secret
from web.errors import RequestError
from web.security import check_rate

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SESSION_LIFETIME = timedelta(hours=12)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_RATE_LIMIT = 10  # sign-in attempts per client address per minute
WRONG_CREDENTIALS = "Wrong user name or password."
AUDIT = "openmsk_audit"  # the app's openmsk.audit.AuditLog in app.extensions (web and viewer apps)
AUDIT_FAILURE_PREFIX = "openmsk:audit:wrong-token:"  # + client address: one audit line a minute


def accepted_tokens(settings: Settings) -> list[str]:
    """The configured tokens, else the generated one if it exists (this never creates it)."""
    if settings.api_tokens:
        return list(settings.api_tokens)
    path = secret_path(settings, API_TOKEN)
    return [path.read_text().strip()] if path.is_file() else []


def hash_password(password: str) -> str:
    """A hash for ``OPENMSK_WEB_USERS`` (Werkzeug's salted scrypt format)."""
    return generate_password_hash(password)


def parse_web_users(value: str) -> dict[str, str]:
    """``user:hash,user:hash`` → ``{user: hash}``; a malformed entry is a :class:`ConfigError`."""
    users: dict[str, str] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name, sep, hashed = item.partition(":")
        if not sep or not name or "$" not in hashed:
            raise ConfigError(
                f"{env_name('web_users')} has an entry that is not user:hash (got {name or '?'}:…): "
                f"expected {Settings.model_fields['web_users'].description}"
            )
        users[name] = hashed
    return users


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass
class Credentials:
    """What the app accepts, read once at start-up."""

    tokens: list[str]
    users: dict[str, str] = field(default_factory=dict)

    def token_principal(self, presented: str) -> str | None:
        for token in self.tokens:
            if hmac.compare_digest(token.encode(), presented.encode()):
                return f"token:{_digest(token)}"
        return None

    def login(self, user: str, password: str) -> str | None:
        """The principal for a sign-in, or ``None``. An empty user means: the password is an API token."""
        if not user:
            return self.token_principal(password)
        hashed = self.users.get(user)
        if hashed is None:
            check_password_hash(_dummy_hash(), password)  # same work either way: no user enumeration
            return None
        return f"user:{user}" if check_password_hash(hashed, password) else None

    def still_valid(self, principal: str) -> bool:
        kind, _, ident = principal.partition(":")
        if kind == "user":
            return ident in self.users
        return kind == "token" and any(hmac.compare_digest(_digest(t), ident) for t in self.tokens)


@cache
def _dummy_hash() -> str:
    return generate_password_hash(secrets.token_urlsafe(8))


def init_auth(app: Flask, settings: Settings) -> None:
    """Configure the session cookie and keep the accepted credentials on the app."""
    app.secret_key = settings.secret_key or stored_secret(settings, WEB_SECRET_KEY)[0]
    app.config.update(
        SESSION_COOKIE_NAME="openmsk_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.web_secure_cookies,
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
    )
    app.extensions["openmsk_auth"] = Credentials(
        accepted_tokens(settings), parse_web_users(settings.web_users)
    )
    app.jinja_env.globals["csrf_token"] = csrf_token


def credentials() -> Credentials:
    return current_app.extensions["openmsk_auth"]


def bearer_principal() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return credentials().token_principal(token.strip())


def session_principal() -> str | None:
    principal = session.get("principal")
    if principal and credentials().still_valid(principal):
        return principal
    return None


def csrf_token() -> str:
    """The session's CSRF token (created on first use), for forms and the pages' scripts."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def check_csrf(submitted: str | None) -> None:
    """Refuse a state-changing, cookie-authenticated request without the session's token."""
    expected = session.get("csrf")
    if not expected or not submitted or not hmac.compare_digest(expected.encode(), submitted.encode()):
        raise RequestError(
            403,
            "CSRF_FAILED",
            "The form's security token is missing or stale.",
            "Reload the page and try again.",
        )


def login_session(principal: str) -> None:
    """Start a fresh session for ``principal`` (a new CSRF token too: nothing carries over from before)."""
    session.clear()
    session.permanent = True
    session["principal"] = principal
    session["csrf"] = secrets.token_urlsafe(24)


def logout_session() -> None:
    """End the session (the form's CSRF token checked here too, whatever the form's encoding)."""
    check_csrf(request.form.get(CSRF_FIELD))
    principal = session_principal()
    if principal is not None and (log := current_app.extensions.get(AUDIT)) is not None:
        audit.sign_out(log, principal=principal, address=request.remote_addr)
    session.clear()


def sign_in_from_form(client: redis.Redis) -> str | None:
    """Check the posted sign-in form (rate-limited per address); on success start a session for the
    principal and return it. The pages and the viewer share this, so both refuse and accept alike.

    The CSRF token is checked here, not only by the callers: a cross-site form (multipart ones included, which
    the pages' generic check leaves to their handlers) must not sign a browser in as somebody else."""
    check_csrf(request.form.get(CSRF_FIELD))
    check_rate(client, "sign-in", request.remote_addr or "?", LOGIN_RATE_LIMIT)
    principal = credentials().login(request.form.get("user", "").strip(), request.form.get("password", ""))
    if principal is not None:
        login_session(principal)
    if (log := current_app.extensions.get(AUDIT)) is not None:
        audit.sign_in(log, principal=principal, address=request.remote_addr)
    return principal


def safe_next(target: str | None, default: str) -> str:
    """Where to go after signing in: *target* only if it is a path on this origin (no scheme, host or
    ``//``), else *default* — an open redirect would send a fresh session anywhere."""
    unsafe = not target or not target.startswith("/") or target.startswith(("//", "/\\"))
    return default if unsafe or urlsplit(target).netloc else target  # type: ignore[return-value]


def _audit_wrong_token() -> None:
    """A bearer token that is not accepted: one audit line per client address and minute (a script retrying
    in a loop must not fill the trail), through a Redis key that expires on its own."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    log = current_app.extensions.get(AUDIT)
    if scheme.lower() != "bearer" or not token.strip() or log is None:
        return
    address = request.remote_addr or "?"
    try:
        first = current_app.extensions["openmsk_redis"].set(
            f"{AUDIT_FAILURE_PREFIX}{address}", 1, nx=True, ex=60
        )
    except redis.RedisError:
        first = True  # better one line too many than a failure unaudited
    if first:
        audit.sign_in(log, principal=None, address=request.remote_addr, reason="wrong-token")


def authenticate_api() -> None:
    """``before_request`` of the API: a bearer token, or the pages' session (then the CSRF header on unsafe
    methods: the pages' scripts send it)."""
    principal = bearer_principal()
    if principal is not None:
        g.principal = principal
        return
    principal = session_principal()
    if principal is None:
        _audit_wrong_token()
        hint = "Send 'Authorization: Bearer <token>' (OPENMSK_API_TOKENS, or DATA_DIR/secrets/api_token)."
        if not credentials().tokens:
            hint = "No API token is configured: set OPENMSK_API_TOKENS or start the node with `openmsk up`."
        raise RequestError(
            401,
            "UNAUTHORIZED",
            "A valid API token is required.",
            hint,
            headers={"WWW-Authenticate": "Bearer"},
        )
    g.principal = principal
    if request.method not in SAFE_METHODS:
        check_csrf(request.headers.get(CSRF_HEADER))


def client_key() -> str:
    """Who a rate limit counts against: the signed-in principal and the remote address."""
    return f"{g.get('principal', 'anonymous')}@{request.remote_addr or '?'}"
