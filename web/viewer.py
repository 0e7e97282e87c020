"""The OHIF viewer on its own origin: the prebuilt app, its generated configuration, and Orthanc behind a proxy.

OHIF's build (``@ohif/app``'s ``dist/``, installed by npm from ``package-lock.json``) expects to live at the
root of its origin, so it gets its own server on ``OPENMSK_VIEWER_PORT`` (:func:`main`, a child of ``openmsk
up``; in the compose deployment a container behind Caddy). One Flask app there:

- serves ``dist/`` with ``index.html`` for every unknown path (``/viewer``, ``/segmentation``: OHIF's routes),
  and ``/app-config.js`` generated from the node's settings (:func:`app_config`): one DICOMweb data source named
  for the node whose roots are this origin's proxy;
- proxies ``/dicom-web/*`` and ``/wado*`` (GET and HEAD only: the viewer is read-only) to Orthanc, streaming the
  answer chunk by chunk. The node adds Orthanc's credentials; the browser's own Authorization header and cookies
  never reach Orthanc, and Orthanc's 401 never reaches the browser (it would open a password prompt). The first
  successful read of a study in a session is a ``study-viewed`` line of the audit trail (:mod:`openmsk.audit`),
  not every frame;
- asks for the node's sign-in first: the same session cookie, secret key and credentials as the web pages
  (:mod:`web.auth`). A cookie belongs to a host, not a port, so a person signed in on the web pages is signed
  in here too; on another host name this app shows its own sign-in form;
- sends a Content-Security-Policy of its own: OHIF needs inline scripts, ``eval``, WebAssembly and blob
  workers, which the pages' strict policy forbids. Cross-origin isolation (COOP/COEP) lets cornerstone use
  SharedArrayBuffer.

Without ``dist/`` every viewer path answers 503 saying how to install it; the proxy keeps working and the web
app's ``/health`` does not depend on the viewer at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import redis
import requests
from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    send_from_directory,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, NotFound

from openmsk import audit
from openmsk.config import REPO_DIR, Settings, load_settings
from openmsk.viewer_links import study_link as study_link  # re-exported: the pages and the tests use it
from openmsk.viewer_links import viewer_base
from web.auth import (
    AUDIT,
    CSRF_FIELD,
    SESSION_LIFETIME,
    WRONG_CREDENTIALS,
    bearer_principal,
    check_csrf,
    credentials,
    init_auth,
    logout_session,
    safe_next,
    session_principal,
    sign_in_from_form,
)
from web.errors import RequestError
from web.security import HEADERS
from web.serving import run_until_signal

log = logging.getLogger("openmsk.viewer")

NPM_INSTALL = "npm ci --omit=dev --ignore-scripts"
PROXY_PREFIXES = ("/dicom-web", "/wado")  # Orthanc's DICOMweb root and its WADO-URI root
OWN_PREFIX = "/openmsk"  # the node's own routes on the viewer origin: sign-in, sign-out, stylesheet
DATA_SOURCE = "openmsk"
THREADS = 16  # OHIF keeps up to ~25 requests in flight; each proxied one holds a thread while it streams
CHUNK = 256 * 1024
VIEWED = "openmsk_viewed_studies"  # app.extensions: the ViewedStudies of the audit trail
VIEWED_LIMIT = 10_000
ORTHANC_TIMEOUT_S = (5, 120)  # connect, read (between chunks)
# Request headers the proxy passes on to Orthanc (everything else, Authorization and Cookie above all, stays).
FORWARD_REQUEST = ("Accept", "Range", "If-None-Match", "If-Modified-Since", "If-Range")
# Response headers passed back (never Set-Cookie or WWW-Authenticate).
FORWARD_RESPONSE = (
    "Content-Type",
    "Content-Length",
    "Content-Encoding",
    "Content-Range",
    "Accept-Ranges",
    "ETag",
    "Last-Modified",
    "Content-Disposition",
)
# Paths that name a file: missing ones are 404, not index.html (a script tag must never get HTML).
FILE_SUFFIXES = frozenset({
    ".js", ".mjs", ".css", ".map", ".wasm", ".json", ".png", ".svg", ".ico", ".jpg", ".gif", ".woff", ".woff2",
    ".ttf", ".txt", ".xml", ".html", ".onnx",
})  # fmt: skip
# OHIF runs inline bootstrap scripts, compiles WebAssembly codecs, builds functions from strings while it decodes
# a SEG (without 'unsafe-eval' loading a SEG fails with an EvalError), starts blob: workers and draws into
# data:/blob: images; everything still comes from this origin only.
VIEWER_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' 'wasm-unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
    "connect-src 'self' data: blob:; worker-src 'self' blob:; media-src 'self' blob:; object-src 'none'; "
    "base-uri 'self'; frame-ancestors 'none'; form-action 'self'"
)
VIEWER_HEADERS = {
    **HEADERS,
    "Content-Security-Policy": VIEWER_CSP,
    "Cross-Origin-Embedder-Policy": "require-corp",
}


# ------------------------------------------------------------------------------------------ configuration


def app_config(settings: Settings) -> dict[str, Any]:
    """OHIF's ``window.config`` for this node: one DICOMweb data source, read-only, through this origin's proxy.

    Relative roots work because the proxy shares the viewer's origin. ``staticWado`` is off and the stock
    config's static-WADO options (``singlepart``, ``bulkDataURI.transform``) are left out: they are meant for
    S3-style servers, not for Orthanc, which renders frames and thumbnails itself (WADO-RS).
    """
    name = f"OpenMSK Node {settings.scp_ae_title}"
    return {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "allowMultiSelectExport": False,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "showErrorDetails": "production",
        "defaultDataSourceName": DATA_SOURCE,
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": DATA_SOURCE,
                "configuration": {
                    "friendlyName": name,
                    "name": DATA_SOURCE,
                    "qidoRoot": "/dicom-web",
                    "wadoRoot": "/dicom-web",
                    "wadoUriRoot": "/wado",
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "staticWado": False,
                    "supportsReject": False,
                    "dicomUploadEnabled": False,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }


def app_config_js(settings: Settings) -> str:
    """:func:`app_config` as the ``app-config.js`` script that OHIF's ``index.html`` loads first."""
    body = json.dumps(app_config(settings), indent=2)
    return (
        "/* Generated by the OpenMSK Node (web/viewer.py) from its settings; served in place of the stock file. */\n"
        f"window.config = {body};\n"
    )


# ------------------------------------------------------------------------------------ the web app's redirect

# Registered on the web app: `/viewer?...` there (a link printed relative, an old bookmark) goes to the viewer.
to_viewer = Blueprint("to_viewer", __name__)


@to_viewer.get("/viewer")
def redirect_to_viewer() -> ResponseReturnValue:
    settings: Settings = current_app.config["OPENMSK_SETTINGS"]
    base = viewer_base(settings, request.host, request.scheme)
    query = request.query_string.decode("ascii", "replace")
    return redirect(f"{base}/viewer" + (f"?{query}" if query else ""), 302)


# ---------------------------------------------------------------------------------------- the viewer app

viewer = Blueprint("viewer", __name__)


def _settings() -> Settings:
    return current_app.config["OPENMSK_SETTINGS"]


def _dist() -> Path:
    return _settings().viewer_dist


def _is_proxy(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PROXY_PREFIXES)


def _message(status: int, code: str, title: str, message: str, hint: str = "") -> Response:
    """An error as JSON for the proxy (the viewer's scripts) and as a small page for a person."""
    if _is_proxy(request.path) or request.accept_mimetypes.best == "application/json":
        response = jsonify({"error": {"code": code, "message": message, "hint": hint}})
    else:
        page = render_template("viewer_page.html", title=title, message=message, hint=hint)
        response = Response(page, mimetype="text/html")
    response.status_code = status
    return response


@viewer.before_app_request
def require_login() -> ResponseReturnValue | None:
    """Everything but the sign-in form and its stylesheet needs a session (or, for scripts, a bearer token)."""
    if request.path.startswith(OWN_PREFIX + "/"):
        return None
    if not _is_proxy(request.path) and not (_dist() / "index.html").is_file():
        return _message(
            503,
            "VIEWER_NOT_INSTALLED",
            "Viewer not installed",
            f"The OHIF viewer is not installed on this node ({_dist()} has no index.html).",
            f"Run `{NPM_INSTALL}` in {REPO_DIR} (part of `make install`), or set OPENMSK_VIEWER_DIST.",
        )
    principal = session_principal() or bearer_principal()
    if principal is None:
        if _is_proxy(request.path):
            return _message(401, "UNAUTHORIZED", "Sign in", "Sign in to the viewer first.")
        return redirect(url_for("viewer.login", next=request.full_path.rstrip("?")))
    g.principal = principal
    return None


@viewer.route(f"{OWN_PREFIX}/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    """The web pages' sign-in, on the viewer's origin (same credentials, rate limit and session)."""
    error = None
    if request.method == "POST":
        check_csrf(request.form.get(CSRF_FIELD))
        if sign_in_from_form(current_app.extensions["openmsk_redis"]) is not None:
            return redirect(safe_next(request.form.get("next"), "/"))
        error = WRONG_CREDENTIALS
    page = render_template(
        "viewer_page.html",
        title="Sign in",
        sign_in=True,
        error=error,
        users=bool(credentials().users),
        next=request.args.get("next", ""),
    )
    return page, 401 if error else 200


@viewer.post(f"{OWN_PREFIX}/logout")
def logout() -> ResponseReturnValue:
    check_csrf(request.form.get(CSRF_FIELD))
    logout_session()
    return redirect(url_for("viewer.login"))


@viewer.get("/app-config.js")
def config_script() -> ResponseReturnValue:
    return Response(app_config_js(_settings()), mimetype="text/javascript")


@viewer.get("/")
@viewer.get("/<path:path>")
def app_file(path: str = "") -> ResponseReturnValue:
    """A file of the build, else ``index.html`` (OHIF routes in the browser), but never HTML for a file name."""
    dist = _dist()
    if path and (dist / path).is_file():
        try:
            return send_from_directory(dist, path)
        except NotFound:
            pass  # outside dist (safe_join refused it): answered below like any unknown path
    if Path(path).suffix.lower() in FILE_SUFFIXES:
        raise RequestError(404, "NOT_FOUND", "There is nothing at this address.")
    return send_from_directory(dist, "index.html")


def _forwarded(settings: Settings) -> str:
    """``Forwarded`` for Orthanc's DICOMweb plugin: the URLs it writes into answers must name this origin.

    The host goes unquoted: RFC 7239 wants quotes around ``host:port``, but the plugin (DICOMweb 1.7) copies
    the value verbatim into its URLs."""
    if settings.viewer_url:
        parts = urlsplit(settings.viewer_url)
        host, proto = parts.netloc, parts.scheme
    else:
        host, proto = request.host, request.scheme
    return f"host={host};proto={proto}"


@viewer.route("/dicom-web", methods=["GET", "HEAD"], defaults={"rest": ""})
@viewer.route("/dicom-web/<path:rest>", methods=["GET", "HEAD"])
@viewer.route("/wado", methods=["GET", "HEAD"], defaults={"rest": ""})
@viewer.route("/wado/<path:rest>", methods=["GET", "HEAD"])
def proxy(rest: str) -> ResponseReturnValue:
    """Stream Orthanc's answer to a DICOMweb / WADO-URI request through, with the node's credentials."""
    settings = _settings()
    if not settings.orthanc_url:
        raise RequestError(503, "NO_ORTHANC", "This node has no Orthanc (OPENMSK_ORTHANC_URL is unset).")
    segments = request.path.split("/")
    if any(s in (".", "..") or "\\" in s for s in segments):
        raise RequestError(404, "NOT_FOUND", "There is nothing at this address.")
    url = settings.orthanc_url + quote(request.path, safe="/:@!$&'()*+,;=-._~")
    if request.query_string:
        url += "?" + request.query_string.decode("latin-1")
    headers = {name: request.headers[name] for name in FORWARD_REQUEST if name in request.headers}
    headers["Accept-Encoding"] = request.headers.get("Accept-Encoding", "identity")
    headers["Forwarded"] = _forwarded(settings)
    auth = (settings.orthanc_user, settings.orthanc_password) if settings.orthanc_user else None
    session: requests.Session = current_app.extensions["openmsk_orthanc_session"]
    try:
        upstream = session.request(
            request.method, url, headers=headers, auth=auth, stream=True, timeout=ORTHANC_TIMEOUT_S
        )
    except requests.RequestException as exc:
        log.warning("Orthanc unreachable for %s: %s", request.path, type(exc).__name__)
        raise RequestError(
            502, "ORTHANC_UNAVAILABLE", "Orthanc did not answer.", "Try again shortly."
        ) from None
    if upstream.status_code in (401, 403):
        upstream.close()
        log.error("Orthanc refused the node's credentials (HTTP %d)", upstream.status_code)
        raise RequestError(
            502,
            "ORTHANC_REFUSED",
            "Orthanc refused the node's credentials.",
            "Check OPENMSK_ORTHANC_USER and OPENMSK_ORTHANC_PASSWORD.",
        )
    if 200 <= upstream.status_code < 300 and request.method == "GET":
        _audit_study(request.path, request.args)
    kept = {name: upstream.headers[name] for name in FORWARD_RESPONSE if name in upstream.headers}

    def body() -> Iterator[bytes]:
        # read1: whatever has arrived (up to CHUNK) goes on at once; nothing waits for the rest of the answer.
        try:
            while data := upstream.raw.read1(CHUNK, decode_content=False):
                yield data
        finally:
            upstream.close()

    response = Response(body(), status=upstream.status_code, headers=kept, direct_passthrough=True)
    response.call_on_close(upstream.close)
    return response


class ViewedStudies:
    """Which (session, study) pairs have had their audit line, so a study is one line per session, not one
    per frame. Kept in memory for :data:`SESSION_LIFETIME` (a session cannot outlive it) and bounded: past
    :data:`VIEWED_LIMIT` pairs the oldest are forgotten (at worst a study is audited again)."""

    def __init__(self, ttl_s: float = SESSION_LIFETIME.total_seconds(), limit: int = VIEWED_LIMIT) -> None:
        self.ttl_s, self.limit = ttl_s, limit
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def first(self, session_key: str, study_uid: str) -> bool:
        """True the first time ``study_uid`` is seen in ``session_key`` (within the TTL)."""
        now = time.monotonic()
        key = (session_key, study_uid)
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen < self.ttl_s:
                return False
            self._seen.pop(key, None)
            self._seen[key] = now
            while len(self._seen) > self.limit:
                self._seen.pop(next(iter(self._seen)))
            return True


def requested_study(path: str, args: Mapping[str, str]) -> str | None:
    """The Study Instance UID a proxied request reads: ``/dicom-web/studies/<uid>/...`` or WADO-URI's
    ``studyUID``; None for searches (QIDO without a study) and anything else."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] == "dicom-web" and parts[2] == "studies" and parts[3]:
        return parts[3]
    if parts[1:2] == ["wado"]:
        return args.get("studyUID") or None
    return None


def _audit_study(path: str, args: Mapping[str, str]) -> None:
    study = requested_study(path, args)
    if study is None:
        return
    principal = g.get("principal")
    # A browser session is told apart by its CSRF token (random per sign-in); a script by its principal.
    session_key = hashlib.sha256(str(session.get("csrf") or principal).encode()).hexdigest()
    if current_app.extensions[VIEWED].first(session_key, study):
        audit.study_viewed(
            current_app.extensions[AUDIT], principal=principal, address=request.remote_addr, study_uid=study
        )


def _viewer_headers(response: Response) -> Response:
    for name, value in VIEWER_HEADERS.items():
        response.headers.setdefault(name, value)
    shell = response.mimetype == "text/html" or request.path == "/app-config.js"
    if response.status_code < 300 and not shell and not _is_proxy(request.path):
        # The build's own files (and the sign-in stylesheet): the same for everybody, behind the sign-in.
        response.headers["Cache-Control"] = "private, max-age=3600"
    else:
        response.headers["Cache-Control"] = "no-store"  # patient data; the app shell follows upgrades at once
    return response


def _error(exc: Exception) -> Response:
    if isinstance(exc, RequestError):
        title = exc.code.replace("_", " ").capitalize()
        response = _message(exc.status, exc.code, title, exc.message, exc.hint)
        response.headers.update(exc.headers)
        return response
    if isinstance(exc, HTTPException):
        code = exc.name.upper().replace(" ", "_")
        return _message(exc.code or 500, code, exc.name, exc.description or exc.name)
    # As in web.errors: the frames go to the log, the exception's message does not (it may quote request data).
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unexpected %s on %s %s\n%s", type(exc).__name__, request.method, request.url_rule, frames)
    return _message(500, "INTERNAL_ERROR", "Internal error", "The viewer could not handle this request.")


def create_viewer_app(settings: Settings | None = None) -> Flask:
    """Build the viewer's app for ``settings`` (read from the environment when not given)."""
    settings = settings or load_settings()
    if settings.redis_url is None:
        raise RuntimeError("OPENMSK_REDIS_URL must be set for the viewer (`openmsk up` manages Redis itself)")
    app = Flask(__name__, static_url_path=f"{OWN_PREFIX}/static")  # the web pages' stylesheet, for sign-in
    app.config.update(OPENMSK_SETTINGS=settings, DEBUG=False, PROPAGATE_EXCEPTIONS=False)
    orthanc = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=THREADS)
    orthanc.mount("http://", adapter)
    orthanc.mount("https://", adapter)
    orthanc.trust_env = False  # Orthanc is local or on the deployment's network: never via an HTTP proxy
    app.extensions.update(
        openmsk_redis=redis.Redis.from_url(settings.redis_url, socket_timeout=5),
        openmsk_orthanc_session=orthanc,
        **{AUDIT: audit.AuditLog(settings.data_path), VIEWED: ViewedStudies()},
    )
    init_auth(app, settings)
    app.register_blueprint(viewer)
    app.after_request(_viewer_headers)
    app.register_error_handler(Exception, _error)
    return app


# --------------------------------------------------------------------------------------------- the server


def serve(settings: Settings) -> int:
    """Run the viewer with waitress on ``OPENMSK_WEB_HOST:OPENMSK_VIEWER_PORT`` until SIGTERM/SIGINT."""
    app = create_viewer_app(settings)
    if not (settings.viewer_dist / "index.html").is_file():
        log.warning("OHIF viewer not installed (%s): run `%s`", settings.viewer_dist, NPM_INSTALL)
    # sign-in forms only: the proxy is read-only
    run_until_signal(app, settings.web_host, settings.viewer_port, 64 * 1024, "viewer", THREADS)
    return 0
