"""The web room: a Flask app factory with blueprints — health now; upload, jobs and results build on it."""

from __future__ import annotations

import redis
from flask import Flask

from openmsk.config import Settings, load_settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the web app for ``settings`` (read from the environment when not given)."""
    settings = settings or load_settings()
    if settings.redis_url is None:
        raise RuntimeError("OPENMSK_REDIS_URL must be set for `openmsk web` (`openmsk up` manages Redis itself)")
    app = Flask(__name__)
    app.config["OPENMSK_SETTINGS"] = settings
    app.extensions["openmsk_redis"] = redis.Redis.from_url(settings.redis_url, socket_timeout=2)

    from web.health import health

    app.register_blueprint(health)
    return app
