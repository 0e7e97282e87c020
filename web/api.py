"""The JSON API under ``/api``: submit uploads, follow jobs, fetch results, list models and stats.

Every route needs a bearer token or the pages' signed-in session (:func:`web.auth.authenticate_api`).
"""

from __future__ import annotations

import zipfile
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, send_file, url_for
from flask.typing import ResponseReturnValue

from openmsk.atomic import atomic_file
from openmsk.config import Settings
from openmsk.heartbeat import live_workers
from openmsk.jobs import Job, JobNotFound, JobState, JobStore
from web import jobview, upload
from web.auth import authenticate_api, client_key
from web.errors import RequestError
from web.security import check_rate
from web.stats import RecentDurations, eta_seconds, node_stats, queue_position

api = Blueprint("api", __name__, url_prefix="/api")
api.before_request(authenticate_api)

PER_PAGE = 20
MAX_PER_PAGE = 100
MIME_TYPES = {
    ".dcm": "application/dicom",
    ".gz": "application/gzip",
    ".png": "image/png",
    ".json": "application/json",
    ".csv": "text/csv",
}
INLINE = {"preview.png"}  # shown in the job page; everything else downloads


def settings() -> Settings:
    return current_app.config["OPENMSK_SETTINGS"]


def store() -> JobStore:
    return current_app.extensions["openmsk_store"]


def durations() -> RecentDurations:
    return current_app.extensions["openmsk_durations"]


def load_job(job_id: str) -> Job:
    """The job, or a 404 (ids are 32 hex digits; anything else cannot name a job)."""
    if len(job_id) != 32 or not all(c in "0123456789abcdef" for c in job_id):
        raise RequestError(404, "JOB_NOT_FOUND", "There is no such job.", "Check the job id.")
    try:
        return store().get(job_id)
    except JobNotFound:
        raise RequestError(404, "JOB_NOT_FOUND", "There is no such job.", "Check the job id.") from None


def job_detail(job: Job) -> dict[str, Any]:
    """The full view of a job, with its queue position and ETA (shared by the API and the job page)."""
    position = queue_position(store(), job)
    workers = running = 0
    if position is not None:  # only a waiting job's ETA depends on the jobs ahead and the workers
        running = store().count(JobState.RUNNING) + store().count(JobState.DELIVERING)
        workers = len(live_workers(store().redis, settings().worker_stale_s))
    eta = eta_seconds(job, position, durations().means().get(job.model), workers, running)
    return jobview.detail(job, settings(), queue_position=position, eta_s=eta)


def parse_state(value: str | None) -> JobState | None:
    if not value:
        return None
    try:
        return JobState(value)
    except ValueError:
        states = ", ".join(s.value for s in JobState)
        raise RequestError(
            400, "BAD_STATE", f"{value!r} is not a job state.", f"Use one of: {states}."
        ) from None


def parse_page(name: str, default: int, maximum: int | None = None) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1 or (maximum is not None and int(raw) > maximum):
        limit = f" and at most {maximum}" if maximum else ""
        raise RequestError(400, "BAD_PAGE", f"{name} must be a whole number from 1{limit}.")
    return int(raw)


def job_page(state: JobState | None, page: int, per_page: int) -> dict[str, Any]:
    """One page of jobs, newest first (shared by the API and the jobs page)."""
    total = store().count(state)
    jobs = store().list(state, (page - 1) * per_page, per_page)
    return {
        "jobs": [jobview.summary(job) for job in jobs],
        "state": state.value if state else None,
        "page": page,
        "per_page": per_page,
        "total": total,
        "pages": max(1, -(-total // per_page)),
    }


@api.post("/jobs")
def create_job() -> ResponseReturnValue:
    """Multipart upload (field ``file``, optional ``model`` and ``series_uid``) → 202 with the job's id."""
    check_rate(store().redis, "upload", client_key(), settings().upload_rate_limit)
    job = upload.submit(request.environ, settings(), store(), current_app.extensions["openmsk_broker"])
    status_url = url_for("api.get_job", job_id=job.id)
    body = {"id": job.id, "status_url": status_url, "page_url": url_for("pages.job", job_id=job.id)}
    return jsonify(body), 202, {"Location": status_url}


@api.get("/jobs")
def list_jobs() -> ResponseReturnValue:
    state = parse_state(request.args.get("state"))
    return jsonify(job_page(state, parse_page("page", 1), parse_page("per_page", PER_PAGE, MAX_PER_PAGE)))


@api.get("/jobs/<job_id>")
def get_job(job_id: str) -> ResponseReturnValue:
    return jsonify(job_detail(load_job(job_id)))


@api.get("/jobs/<job_id>/files/<name>")
def job_file(job_id: str, name: str) -> Response:
    job = load_job(job_id)
    path = jobview.job_file(job, name, settings())
    if path is None:
        raise RequestError(
            404,
            "FILE_NOT_FOUND",
            f"The job has no file {name!r}.",
            "The files may have expired; see the job's files list.",
        )
    return send_file(
        path,
        mimetype=MIME_TYPES.get(path.suffix, "application/octet-stream"),
        as_attachment=name not in INLINE,
        download_name=f"openmsk-{job.id[:8]}-{name}",
        conditional=True,
        max_age=0,
    )


@api.get("/jobs/<job_id>/results.zip")
def results_zip(job_id: str) -> Response:
    """All of a done job's outputs as one zip, built once next to them and kept until they expire."""
    job = load_job(job_id)
    if job.state is not JobState.DONE:
        raise RequestError(
            409,
            "NOT_DONE",
            f"The job is {job.state.value}; results come when it is done.",
            "Follow the job's status_url.",
        )
    files = jobview.output_files(job, settings())
    if not files:
        raise RequestError(410, "FILES_EXPIRED", "The job's files have expired.", "Send the series again.")
    target = settings().data_path / "jobs" / job.id / "results.zip"
    if not target.exists():
        with atomic_file(target) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, path in files.items():
                archive.write(path, arcname=name)
    return send_file(
        target,
        mimetype="application/zip",
        as_attachment=True,
        download_name=f"openmsk-{job.id[:8]}-results.zip",
        max_age=0,
    )


@api.get("/models")
def list_models() -> ResponseReturnValue:
    """The offered models: name, kind, version, description, default (exactly one marked), status."""
    return jsonify({"models": upload.offered_models(settings())})


@api.get("/stats")
def stats() -> ResponseReturnValue:
    return jsonify(node_stats(store(), store().redis, durations(), settings().worker_stale_s))
