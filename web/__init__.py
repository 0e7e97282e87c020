"""The web room: a Flask app factory with blueprints, served by waitress (``web.server``).

Blueprints, one responsibility each: ``health`` (``/health``) and ``metrics`` (``/metrics``), open to
monitoring; ``api`` (``/api/...``, JSON, bearer token or session) and ``pages`` (HTML, signed-in session);
``to_viewer`` sends ``/viewer?...`` on to the OHIF viewer, which ``web.viewer`` serves on its own port.
Cross-cutting pieces live in their own modules: ``context`` (the app's settings, job store, Redis, broker,
for every request), ``auth`` (tokens, sign-in, CSRF), ``security`` (headers, rate limits), ``errors`` (JSON or
a page for every error, never a traceback), ``upload`` (receive, inspect, submit), ``stats`` and ``jobview``
(what a job and the queue look like), ``retention`` (periodic cleanup, run by the server).
"""

from __future__ import annotations

import redis
from flask import Flask

import web.context as context
from openmsk.audit import AuditLog
from openmsk.config import Settings, load_settings
from openmsk.jobs import JobStore
from openmsk.queue import make_broker
from web.api import api as api_blueprint
from web.audit_events import register_audit_events
from web.auth import init_auth
from web.errors import register_error_handlers
from web.health import health as health_blueprint
from web.metrics import metrics as metrics_blueprint
from web.pages import pages as pages_blueprint
from web.security import register_security_headers
from web.stats import RecentDurations
from web.viewer import to_viewer as to_viewer_blueprint


def create_app(settings: Settings | None = None) -> Flask:
    """Build the web app for ``settings`` (read from the environment when not given)."""
    settings = settings or load_settings()
    if settings.redis_url is None:
        raise RuntimeError(
            "OPENMSK_REDIS_URL must be set for `openmsk web` (`openmsk up` manages Redis itself)"
        )
    app = Flask(__name__)
    app.config.update({context.SETTINGS: settings, "DEBUG": False, "PROPAGATE_EXCEPTIONS": False})
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    audit_log = AuditLog(settings.data_path)
    store = JobStore(client, audit=audit_log)
    app.extensions.update(
        {
            context.REDIS: client,
            context.STORE: store,
            context.BROKER: make_broker(settings.redis_url),
            context.DURATIONS: RecentDurations(store),
        }
    )
    init_auth(app, settings)
    register_audit_events(app, audit_log)
    register_security_headers(app, hsts=settings.web_secure_cookies)
    register_error_handlers(app)
    # Aliased: the package's own attributes `web.api` etc. must stay the modules.
    blueprints = (health_blueprint, metrics_blueprint, api_blueprint, pages_blueprint, to_viewer_blueprint)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    return app
