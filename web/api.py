"""The JSON API under ``/api``: submit uploads, follow jobs, fetch results, list models and stats.

Every route needs a bearer token or the pages' signed-in session (:func:`web.auth.authenticate_api`).
"""

from __future__ import annotations

import zipfile

from flask import Blueprint, Response, jsonify, request, send_file, url_for
from flask.typing import ResponseReturnValue

import web.jobview as jobview
from openmsk.atomic import atomic_file
from openmsk.jobs import JobState
from web.auth import authenticate_api, client_key
from web.context import broker, durations, objects, settings, store
from web.errors import RequestError
from web.jobview import MAX_PER_PAGE, PER_PAGE, job_detail, job_page, load_job, parse_page, parse_state
from web.security import check_rate
from web.stats import node_stats
from web.upload import offered_models, submit

api = Blueprint("api", __name__, url_prefix="/api")
api.before_request(authenticate_api)

MIME_TYPES = {
    ".dcm": "application/dicom",
    ".gz": "application/gzip",
    ".png": "image/png",
    ".json": "application/json",
    ".csv": "text/csv",
}
INLINE = {"preview.png"}  # shown in the job page; everything else downloads


@api.post("/jobs")
def create_job() -> ResponseReturnValue:
    """Multipart upload (field ``file``, optional ``model`` and ``series_uid``) → 202 with the job's id."""
    check_rate(store().redis, "upload", client_key(), settings().upload_rate_limit)
    job = submit(request.environ, settings(), store(), broker(), objects=objects())
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
    return jsonify({"models": offered_models(settings())})


@api.get("/stats")
def stats() -> ResponseReturnValue:
    return jsonify(node_stats(store(), store().redis, durations(), settings().worker_stale_s))
