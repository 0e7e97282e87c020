"""The HTML pages: sign-in, upload, the jobs list with its stats panel, and the job page.

The pages render on the server from the same views the API answers (``web.jobview``); their scripts only add
the upload progress and the live job progress, by calling the API with the session cookie and the CSRF
header.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import requests
from flask import Blueprint, g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from werkzeug.datastructures import MultiDict

import web.jobview as jobview
from openmsk.jobs import JobState
from web.auth import (
    CSRF_FIELD,
    SAFE_METHODS,
    WRONG_CREDENTIALS,
    check_csrf,
    client_key,
    credentials,
    logout_session,
    safe_next,
    session_principal,
    sign_in_from_form,
)
from web.context import broker, durations, objects, settings, store
from web.errors import RequestError
from web.jobview import PER_PAGE, job_detail, job_page, load_job, parse_page, parse_state
from web.security import check_rate
from web.stats import node_stats
from web.upload import offered_models, submit
from web.viewer import study_link

pages = Blueprint("pages", __name__)

PUBLIC_ENDPOINTS = {"pages.login"}


@pages.before_request
def require_login() -> ResponseReturnValue | None:
    """Pages need a signed-in session; forms (other than the multipart upload) need their CSRF token."""
    if request.method not in SAFE_METHODS and request.mimetype != "multipart/form-data":
        check_csrf(request.form.get(CSRF_FIELD))
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    principal = session_principal()
    if principal is None:
        return redirect(url_for("pages.login", next=request.full_path.rstrip("?")))
    g.principal = principal
    return None


@pages.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    error = None
    if request.method == "POST":
        if sign_in_from_form(store().redis) is not None:
            return redirect(safe_next(request.form.get("next"), url_for("pages.upload_page")))
        error = WRONG_CREDENTIALS
    users = bool(credentials().users)
    status = 401 if error else 200
    return render_template("login.html", error=error, users=users, next=request.args.get("next", "")), status


@pages.post("/logout")
def logout() -> ResponseReturnValue:
    logout_session()
    return redirect(url_for("pages.login"))


def _models() -> tuple[list[dict[str, Any]], str | None]:
    try:
        return offered_models(settings()), None
    except RequestError as exc:
        return [], exc.message


@pages.get("/")
def upload_page() -> ResponseReturnValue:
    models, models_error = _models()
    return render_template(
        "upload.html", models=models, models_error=models_error, max_upload_mb=settings().max_upload_mb
    )


@pages.post("/upload")
def upload_form() -> ResponseReturnValue:
    """The upload form without scripts: the same submission as ``POST /api/jobs``, answered with pages."""
    check_rate(store().redis, "upload", client_key(), settings().upload_rate_limit)

    def check_form(form: MultiDict[str, str]) -> None:
        check_csrf(form.get(CSRF_FIELD))

    try:
        job = submit(request.environ, settings(), store(), broker(), check_form, objects=objects())
    except RequestError as exc:
        models, models_error = _models()
        page = render_template(
            "upload.html",
            models=models,
            models_error=models_error,
            max_upload_mb=settings().max_upload_mb,
            error=exc,
            series=exc.extra.get("series", []),
        )
        return page, exc.status
    return redirect(url_for("pages.job", job_id=job.id), 303)


@pages.get("/jobs")
def jobs() -> ResponseReturnValue:
    state = parse_state(request.args.get("state"))
    listing = job_page(state, parse_page("page", 1), PER_PAGE)
    stats = node_stats(store(), store().redis, durations(), settings().worker_stale_s)
    return render_template("jobs.html", listing=listing, stats=stats, states=[s.value for s in JobState])


@pages.get("/jobs/<job_id>")
def job(job_id: str) -> ResponseReturnValue:
    record = load_job(job_id)
    detail = job_detail(record)
    report = jobview.read_report(record, settings()) if record.state is JobState.DONE else None
    files = {row["name"]: row for row in detail["files"]}
    downloads = [(files[name], label) for name, label in jobview.DOWNLOADS if name in files]
    orthanc = record.deliveries.get("orthanc")
    in_orthanc = bool(record.study_uid and settings().orthanc_url and orthanc and orthanc.status == "done")
    viewer_link = (
        study_link(settings(), record.study_uid, request.host, request.scheme) if in_orthanc else None
    )
    return render_template(
        "job.html",
        job=record,
        detail=detail,
        measurements=jobview.measurement_rows(report) if report else [],
        report=report,
        preview=files.get("preview.png"),
        downloads=downloads,
        orthanc_link=in_orthanc,
        viewer_link=viewer_link,
        retention_hours=settings().retention_hours,
    )


@pages.get("/jobs/<job_id>/orthanc")
def orthanc_study(job_id: str) -> ResponseReturnValue:
    """Redirect to the job's study in Orthanc Explorer (looked up by StudyInstanceUID)."""
    record = load_job(job_id)
    node = settings()
    if not record.study_uid or not node.orthanc_url:
        raise RequestError(404, "NOT_IN_ORTHANC", "This job has no study in Orthanc.")
    auth = (node.orthanc_user, node.orthanc_password) if node.orthanc_user else None
    try:
        response = requests.post(
            f"{node.orthanc_url}/tools/lookup", data=record.study_uid, auth=auth, timeout=5
        )
        response.raise_for_status()
        found = [item["ID"] for item in response.json() if item.get("Type") == "Study"]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        raise RequestError(
            502, "ORTHANC_UNAVAILABLE", "Orthanc did not answer.", "Try again shortly."
        ) from None
    if not found:
        raise RequestError(404, "NOT_IN_ORTHANC", "Orthanc does not hold this study (any more).")
    return redirect(f"{node.orthanc_url}/app/explorer.html#study?uuid={found[0]}")


@pages.app_template_filter("when")
def when(timestamp: float | None) -> str:
    """A timestamp as the node's local date and time."""
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


@pages.app_template_filter("duration")
def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.0f} s" if float(seconds).is_integer() else f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


@pages.app_template_filter("number")
def number(value: object, digits: int = 1) -> str:
    """A measurement with thousands separators; an absent value as a dash."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "—"
    return f"{value:,.{digits}f}"


@pages.app_template_filter("filesize")
def filesize(size: int) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size:.1f} GB"
