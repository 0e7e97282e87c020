"""What the API and the pages show of a job: one function per view, both read the same record.

Files are exposed by their base names only (``seg.dcm``, ``report.json``...); a name resolves to a path only
through the job's own ``files`` list, so a URL can never reach anything else under ``DATA_DIR``.

The source images' way to the archive (``job.archive``) is read from the forwarder's state in Redis
(:class:`openmsk.forwarding.ForwardStates`); the web only shows it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath
from typing import Any

from flask import request, url_for

import web.context as context
from openmsk.config import Settings
from openmsk.forwarding import ForwardState, instances_digest
from openmsk.heartbeat import live_workers
from openmsk.jobs import STAGES, Delivery, Job, JobNotFound, JobState
from openmsk.labels import TISSUES
from openmsk.regions import REGIONS_BY_NAME
from web.errors import RequestError
from web.outputs import ensure_outputs
from web.retention import expires_at
from web.stats import eta_seconds, queue_position

REPORT_MAX_BYTES = 2 * 1024 * 1024
# Downloads the job page offers, in this order, with their labels.
DOWNLOADS = (
    ("seg.dcm", "DICOM SEG"),
    ("sr.dcm", "DICOM SR"),
    ("labels.nii.gz", "Labels (NIfTI)"),
    ("report.csv", "Report (CSV)"),
    ("report.json", "Report (JSON)"),
)
PER_PAGE = 20
MAX_PER_PAGE = 100


def output_files(job: Job, settings: Settings) -> dict[str, Path]:
    """The job's files still on disk, by base name: the only names a URL can ask for."""
    ensure_outputs(job)  # made by a worker on another host: fetched from the object store first
    found: dict[str, Path] = {}
    for relative in job.files:
        path = (settings.data_path / relative).resolve()
        if path.is_relative_to(settings.data_path) and path.is_file():
            found.setdefault(PurePosixPath(relative).name, path)
    return found


def job_file(job: Job, name: str, settings: Settings) -> Path | None:
    """The path of the job's output called ``name``, if the job lists it and it is still on disk."""
    return output_files(job, settings).get(name)


def stage_rows(job: Job, now: float | None = None) -> list[dict[str, Any]]:
    """Every pipeline stage in order: pending, running or done, with its duration (so far)."""
    now = time.time() if now is None else now
    rows = []
    for name in STAGES:
        timing = job.stages.get(name)
        if timing is None or timing.started_at is None:
            rows.append({"name": name, "state": "pending", "duration_s": None})
        elif timing.finished_at is None and job.stage == name and not job.terminal:
            rows.append({"name": name, "state": "running", "duration_s": round(now - timing.started_at, 1)})
        else:
            duration = timing.duration_s
            rows.append(
                {
                    "name": name,
                    "state": "done",
                    "duration_s": None if duration is None else round(duration, 1),
                }
            )
    return rows


def file_rows(job: Job, settings: Settings) -> list[dict[str, Any]]:
    return [
        {"name": name, "size": path.stat().st_size, "url": url_for("api.job_file", job_id=job.id, name=name)}
        for name, path in output_files(job, settings).items()
    ]


def summary(job: Job) -> dict[str, Any]:
    """The short form, for lists."""
    return {
        "id": job.id,
        "state": job.state.value,
        "stage": job.stage,
        "percent": round(job.percent, 1),
        "model": job.model,
        "source": job.source,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "error_code": job.error.code.value if job.error else None,
        "status_url": url_for("api.get_job", job_id=job.id),
    }


def archive_states(job: Job, found: dict[str, ForwardState]) -> dict[str, ForwardState]:
    """The state of the job's images at each of its archive destinations.

    ``found`` is the forwarder's record for the series; a state about another set of instances (an earlier
    or later send of the same series) or none yet reads as pending.
    """
    digest = instances_digest(job.sop_uids) if job.sop_uids else ""
    total = len(set(job.sop_uids))
    states = {}
    for name in job.archive:
        state = found.get(name)
        if state is None or (digest and state.digest and state.digest != digest):
            state = ForwardState(digest=digest, total=total)
        states[name] = state
    return states


def archive_line(name: str, state: ForwardState, now: float | None = None) -> str:
    """One line about the images' way to ``name``, as the job page shows it."""
    now = time.time() if now is None else now
    what = f"Images to {name}: "
    if state.status == "done":
        return what + "archived"
    if state.status == "skipped":
        return what + "already there"
    if state.status == "pending":
        if state.sent or state.attempts:
            return what + f"{state.sent}/{state.total} sent"
        return what + f"waiting to be sent ({state.total} image{'s' if state.total != 1 else ''})"
    parts = [f"attempt {state.attempts}"] if state.attempts else []
    if state.next_attempt_at is not None:
        parts.append(f"next in {max(0, round(state.next_attempt_at - now))} s")
    if state.sent:
        parts.append(f"{state.sent}/{state.total} sent")
    status = "retrying" if state.status == "retrying" else "failed, still retried"
    line = what + status + (f" ({', '.join(parts)})" if parts else "")
    return line + (f": {state.last_error}" if state.last_error else "")


def delivery_line(name: str, delivery: Delivery) -> str:
    """One line about the results' delivery to ``name``."""
    what = f"Results to {name}: "
    if delivery.status == "done":
        return what + "delivered"
    if delivery.status == "waiting":
        return what + f"waiting for the images to reach {name}"
    if delivery.status == "pending":
        return what + "pending"
    line = what + (f"retrying (attempt {delivery.attempts})" if delivery.status == "retrying" else "failed")
    return line + (f": {delivery.last_error}" if delivery.last_error else "")


def detail(
    job: Job,
    settings: Settings,
    *,
    queue_position: int | None,
    eta_s: float | None,
    archive: dict[str, ForwardState] | None = None,
) -> dict[str, Any]:
    """Everything ``GET /api/jobs/<id>`` answers (``archive``: see :func:`archive_states`)."""
    files = file_rows(job, settings)
    now = time.time()
    return {
        **summary(job),
        "stages": stage_rows(job),
        "queue_position": queue_position,
        "eta_seconds": None if eta_s is None else round(eta_s),
        "error": job.error.model_dump() if job.error else None,
        "files": files,
        "results_url": url_for("api.results_zip", job_id=job.id)
        if job.state is JobState.DONE and files
        else None,
        "deliveries": {
            name: {**d.model_dump(), "summary": delivery_line(name, d)} for name, d in job.deliveries.items()
        },
        "archive": {
            name: {**state.model_dump(), "summary": archive_line(name, state, now)}
            for name, state in (archive or {}).items()
        },
        "expires_at": expires_at(job, settings),
        "attempts": job.attempts,
        "waiting": job.waiting or None,
        "input_via": job.input_via or None,
        "regions": region_rows(report) if (report := _done_report(job, settings)) else [],
    }


def _done_report(job: Job, settings: Settings) -> dict[str, Any] | None:
    return read_report(job, settings) if job.state is JobState.DONE else None


def read_report(job: Job, settings: Settings) -> dict[str, Any] | None:
    """The job's ``report.json``, or ``None`` when missing, too large or unreadable."""
    path = job_file(job, "report.json", settings)
    if path is None or path.stat().st_size > REPORT_MAX_BYTES:
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def measurement_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The measurement table of the job page: one row per tissue in label order, with its colour.

    Reads the ``tissues`` table of ``report.json`` (``worker.report``: the ``analyse()`` output per tissue).
    """
    tissues = report.get("tissues")
    if not isinstance(tissues, dict):
        return []
    by_name = {tissue.name: tissue for tissue in TISSUES.values()}
    rows = []
    for name, entry in tissues.items():
        if not isinstance(entry, dict):
            continue
        tissue = by_name.get(name)
        thickness = entry.get("thickness_mm") if isinstance(entry.get("thickness_mm"), dict) else None
        rows.append(
            {
                "label": entry.get("label", tissue.label if tissue else 0),
                "name": entry.get("display_name") or (tissue.display_name if tissue else name),
                "colour": "#{:02x}{:02x}{:02x}".format(*tissue.rgb) if tissue else "#888888",
                "volume_mm3": entry.get("volume_mm3"),
                "cartilage": bool(tissue and tissue.is_cartilage),
                "thickness": {k: thickness.get(k) for k in ("mean", "median", "std", "p95")}
                if thickness
                else None,
                "t2": entry["t2_ms"] if isinstance(entry.get("t2_ms"), dict) else None,  # the T2 analysis's
            }
        )
    return sorted(rows, key=lambda row: row["label"] if isinstance(row["label"], int) else 999)


def region_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The cartilage subregion table (job page and API): one row per region of ``report.json``'s ``regions``
    in label order, with volume, thickness mean and median, status and, when not measurable, the reason."""
    regions = report.get("regions")
    if not isinstance(regions, dict):
        return []
    rows = []
    for name, entry in regions.items():
        if not isinstance(entry, dict):
            continue
        known = REGIONS_BY_NAME.get(name)
        thickness = entry.get("thickness_mm") if isinstance(entry.get("thickness_mm"), dict) else None
        rows.append(
            {
                "name": name,
                "label": entry.get("label", known.label if known else 0),
                "display_name": entry.get("display_name") or (known.display_name if known else name),
                "tissue": entry.get("tissue"),
                "colour": "#{:02x}{:02x}{:02x}".format(*known.rgb) if known else "#888888",
                "volume_mm3": entry.get("volume_mm3"),
                "thickness": {k: thickness.get(k) for k in ("mean", "median")} if thickness else None,
                "status": entry.get("status"),
                "reason": entry.get("reason"),
            }
        )
    return sorted(rows, key=lambda row: row["label"] if isinstance(row["label"], int) else 999)


# ------------------------------------------------------------------------- views of the app's job store


def load_job(job_id: str) -> Job:
    """The job, or a 404 (ids are 32 hex digits; anything else cannot name a job)."""
    if len(job_id) != 32 or not all(c in "0123456789abcdef" for c in job_id):
        raise RequestError(404, "JOB_NOT_FOUND", "There is no such job.", "Check the job id.")
    try:
        return context.store().get(job_id)
    except JobNotFound:
        raise RequestError(404, "JOB_NOT_FOUND", "There is no such job.", "Check the job id.") from None


def job_detail(job: Job) -> dict[str, Any]:
    """The full view of a job, with its queue position, ETA and archive state (the API and the job page)."""
    store, settings = context.store(), context.settings()
    position = queue_position(store, job)
    workers = running = 0
    if position is not None:  # only a waiting job's ETA depends on the jobs ahead and the workers
        running = store.count(JobState.RUNNING) + store.count(JobState.DELIVERING)
        workers = len(live_workers(store.redis, settings.worker_stale_s))
    eta = eta_seconds(job, position, context.durations().means().get(job.model), workers, running)
    found = context.forward_states().get(job.series_uid) if job.archive and job.series_uid else {}
    return detail(job, settings, queue_position=position, eta_s=eta, archive=archive_states(job, found))


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
    store = context.store()
    total = store.count(state)
    jobs = store.list(state, (page - 1) * per_page, per_page)
    return {
        "jobs": [summary(job) for job in jobs],
        "state": state.value if state else None,
        "page": page,
        "per_page": per_page,
        "total": total,
        "pages": max(1, -(-total // per_page)),
    }
