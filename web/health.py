"""``GET /health``: JSON report, 200 only when healthy (503 otherwise), open to monitoring without a token."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

from openmsk.health import check_health
from web.context import objects, redis_client, settings

health = Blueprint("health", __name__)


@health.get("/health")
def get_health() -> ResponseReturnValue:
    report = check_health(settings(), redis_client(), objects())
    return jsonify(report), 200 if report["status"] == "healthy" else 503
