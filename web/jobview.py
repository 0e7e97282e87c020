"""What the API and the pages show of a job: one function per view, both read the same record.

Files are exposed by their base names only (``seg.dcm``, ``report.json``...); a name resolves to a path only
through the job's own ``files`` list, so a URL can never reach anything else under ``DATA_DIR``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath
from typing import Any

from flask import url_for

from openmsk.config import Settings
from openmsk.jobs import STAGES, Job, JobState
from openmsk.labels import TISSUES
from web.retention import expires_at

REPORT_MAX_BYTES = 2 * 1024 * 1024
# Downloads the job page offers, in this order, with their labels.
DOWNLOADS = (
    ("seg.dcm", "DICOM SEG"),
    ("sr.dcm", "DICOM SR"),
    ("labels.nii.gz", "Labels (NIfTI)"),
    ("report.csv", "Report (CSV)"),
    ("report.json", "Report (JSON)"),
)


def output_files(job: Job, settings: Settings) -> dict[str, Path]:
    """The job's files still on disk, by base name: the only names a URL can ask for."""
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


def detail(
    job: Job, settings: Settings, *, queue_position: int | None, eta_s: float | None
) -> dict[str, Any]:
    """Everything ``GET /api/jobs/<id>`` answers."""
    files = file_rows(job, settings)
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
        "deliveries": {name: d.model_dump() for name, d in job.deliveries.items()},
        "expires_at": expires_at(job, settings),
        "attempts": job.attempts,
    }


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
            }
        )
    return sorted(rows, key=lambda row: row["label"] if isinstance(row["label"], int) else 999)
