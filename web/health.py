"""``GET /health``: JSON report, 200 only when healthy (503 otherwise), open to monitoring without a token."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue

from openmsk.health import check_health

health = Blueprint("health", __name__)


@health.get("/health")
def get_health() -> ResponseReturnValue:
    report = check_health(current_app.config["OPENMSK_SETTINGS"], current_app.extensions["openmsk_redis"])
    return jsonify(report), 200 if report["status"] == "healthy" else 503
