"""Audit lines of the web app that no single view owns: results downloaded through the API.

An ``after_request`` hook rather than code in the views: the API's views stay about serving files, and every
download endpoint is listed here, in one place. A download is recorded once it is answered 2xx — a 304 sends
nothing, and of a ranged download only the part that starts at byte 0 counts, so a client fetching a file in
pieces is one line, not one per piece.
"""

from __future__ import annotations

from flask import Flask, Response, current_app, g, request

from openmsk import audit
from openmsk.jobs import JobNotFound
from web.auth import AUDIT
from web.context import store

# Endpoint → the file name to record when the URL has none.
DOWNLOAD_ENDPOINTS: dict[str, str | None] = {"api.results_zip": "results.zip", "api.job_file": None}


def audit_log() -> audit.AuditLog:
    """The app's audit log (inside an application context)."""
    return current_app.extensions[AUDIT]


def _first_part(range_header: str | None) -> bool:
    return not range_header or range_header.replace(" ", "").startswith("bytes=0-")


def record_download(response: Response) -> Response:
    """``after_request``: a 2xx GET of a download endpoint becomes a results-downloaded line."""
    if (
        request.endpoint not in DOWNLOAD_ENDPOINTS
        or request.method != "GET"
        or not 200 <= response.status_code < 300
        or not _first_part(request.headers.get("Range"))
    ):
        return response
    args = request.view_args or {}
    try:
        job = store().get(str(args.get("job_id", "")))
    except JobNotFound:
        return response
    audit.results_downloaded(
        audit_log(),
        job_id=job.id,
        principal=g.get("principal"),
        address=request.remote_addr,
        study_uid=job.study_uid,
        series_uid=job.series_uid,
        file=str(args.get("name") or DOWNLOAD_ENDPOINTS[request.endpoint]),
    )
    return response


def register_audit_events(app: Flask, log: audit.AuditLog) -> None:
    app.extensions[AUDIT] = log
    app.after_request(record_download)
