"""Retention: uploads and job outputs expire ``OPENMSK_RETENTION_HOURS`` after their job ends.

A periodic pass (a daemon thread of the web server, run by one web process at a time through a Redis
lock) removes ``DATA_DIR/uploads/<id>/`` and ``DATA_DIR/jobs/<id>/`` of every finished job past its expiry
and empties the job's ``files`` list, so the pages and the API say the files are gone instead of failing to
serve them. The job record itself stays (the list, the stats and the metrics count it), and so does
everything that was delivered: the copies in Orthanc or a PACS belong to them, and this pass never contacts
a destination.

Upload folders that never became a job (a crash mid-upload) are removed once they are older than the
retention period too.

So are the images the SCP received (``DATA_DIR/incoming/<study>/<series>/``, and their copies in the object
store): a series folder goes once nothing arrived in it for the retention period, every job of the series has
expired (the newest job per model, ``openmsk:series-latest:``), and neither the forward outbox (images still
on their way to the archive) nor the SCP's job outbox (a job waiting for Redis) names it. Series no rule took
(no job) go the same way. The folder is first renamed out of ``incoming/`` (atomic), so an instance the SCP
stores into it at that moment is put back, never deleted after its C-STORE was answered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from openmsk.config import INCOMING, Settings
from openmsk.forwarding import ForwardOutbox
from openmsk.jobs import INDEX_STATE, KEY_PREFIX, LATEST_PREFIX, Job, JobNotFound, JobState, JobStore
from openmsk.objectstore import ObjectStore, StorageError, store_for
from openmsk.spool import JOB_SPOOL, RecordFolder

log = logging.getLogger("openmsk.web.retention")

LOCK_KEY = "openmsk:retention:lock"
EXPIRED = "expired"  # DATA_DIR/expired/: series folders being removed (same file system as incoming/)
MIN_INTERVAL_S = 60.0
MAX_INTERVAL_S = 3600.0
_FINISHED = (JobState.DONE, JobState.FAILED)


def retention_s(settings: Settings) -> float:
    return settings.retention_hours * 3600.0


def expires_at(job: Job, settings: Settings) -> float | None:
    """When the job's files go: ``retention`` after it finished; ``None`` while it still runs."""
    if not job.terminal:
        return None
    finished = job.state_times.get(job.state.value, job.updated_at)
    return finished + retention_s(settings)


@dataclass
class CleanupReport:
    jobs: int = 0
    orphans: int = 0
    series: int = 0  # received series removed from incoming/


def _remove_job_files(settings: Settings, job_id: str, objects: ObjectStore | None = None) -> bool:
    removed = False
    if objects is not None and not objects.shared_disk:
        # The object store's copies go with the local ones (workers' fetch caches evict on their own).
        for prefix in (f"uploads/{job_id}", f"jobs/{job_id}"):
            try:
                removed = objects.delete_prefix(prefix) > 0 or removed
            except StorageError as exc:
                log.warning("retention: %s not removed from the object store: %s", prefix, exc)
    for folder in (settings.data_path / "uploads" / job_id, settings.data_path / "jobs" / job_id):
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed = True
    return removed


def cleanup(
    settings: Settings, store: JobStore, now: float | None = None, objects: ObjectStore | None = None
) -> CleanupReport:
    """One retention pass; returns what it removed. Safe to run concurrently (removal is idempotent)."""
    now = time.time() if now is None else now
    cutoff = now - retention_s(settings)
    report = CleanupReport()
    data = settings.data_path
    for state in _FINISHED:
        # A job finishes after it is created: only jobs created before the cutoff can have expired.
        for raw_id in store.redis.zrangebyscore(INDEX_STATE + state.value, "-inf", cutoff):
            job_id = raw_id.decode()
            if not ((data / "uploads" / job_id).exists() or (data / "jobs" / job_id).exists()):
                continue
            try:
                job = store.get(job_id)
            except JobNotFound:
                continue
            expiry = expires_at(job, settings)
            if expiry is None or expiry > now:
                continue
            if _remove_job_files(settings, job_id, objects):
                report.jobs += 1
            store.update(job_id, lambda j: setattr(j, "files", []))
    uploads = data / "uploads"
    if uploads.is_dir():
        for folder in uploads.iterdir():
            if folder.stat().st_mtime > cutoff or store.redis.exists(KEY_PREFIX + folder.name):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            report.orphans += 1
    report.series = _remove_expired_series(settings, store, now, cutoff, objects)
    if report.jobs or report.orphans or report.series:
        log.info(
            "retention: removed the files of %d job(s), %d orphaned upload(s) and %d received series",
            report.jobs,
            report.orphans,
            report.series,
        )
    return report


def _series_held(data: Path) -> set[str]:
    """Series folders (relative to DATA_DIR) an outbox still needs: forwarding to the archive, or queueing."""
    held = {order.folder for order in ForwardOutbox(data).orders()}
    if (data / JOB_SPOOL).is_dir():
        held |= {job.input_path for job in RecordFolder(data / JOB_SPOOL, Job).read_all()}
    return {rel.rstrip("/") for rel in held}


def _newest_jobs(store: JobStore) -> dict[str, list[str]]:
    """Series UID -> the newest job of each model for it (one SCAN of the ``series-latest`` hashes)."""
    newest: dict[str, list[str]] = {}
    for raw in store.redis.scan_iter(match=f"{LATEST_PREFIX}*", count=500):
        series_uid = raw.decode()[len(LATEST_PREFIX) :].split(":", 1)[0]  # a UID has no colon
        job_id = store.redis.hget(raw, "job")
        if job_id is not None:
            newest.setdefault(series_uid, []).append(job_id.decode())
    return newest


def _jobs_still_need(store: JobStore, settings: Settings, job_ids: list[str], now: float) -> bool:
    """Whether any of these jobs still runs or has not expired."""
    for job_id in job_ids:
        try:
            expiry = expires_at(store.get(job_id), settings)
        except JobNotFound:
            continue
        if expiry is None or expiry > now:
            return True
    return False


def _remove_expired_series(
    settings: Settings, store: JobStore, now: float, cutoff: float, objects: ObjectStore | None
) -> int:
    data = settings.data_path
    incoming = data / INCOMING
    if not incoming.is_dir():
        return 0
    held: set[str] | None = None  # read once, and only when some folder is old enough
    newest: dict[str, list[str]] = {}
    removed = 0
    for study in incoming.iterdir():
        if study.name.startswith(".") or not study.is_dir():
            continue  # .partial/: the SCP's files being written
        for series in study.iterdir():
            # A file renamed into the folder updates its mtime: an old folder received nothing since.
            if not series.is_dir() or series.stat().st_mtime > cutoff:
                continue
            rel = f"{INCOMING}/{study.name}/{series.name}"
            if held is None:
                held, newest = _series_held(data), _newest_jobs(store)
            if rel in held or _jobs_still_need(store, settings, newest.get(series.name, []), now):
                continue
            if _remove_series(data, series, cutoff):
                removed += 1
                if objects is not None and not objects.shared_disk:
                    try:
                        objects.delete_prefix(rel)
                    except StorageError as exc:
                        log.warning("retention: %s not removed from the object store: %s", rel, exc)
        if study.stat().st_mtime <= cutoff:  # empty and untouched for the period (the SCP may be making one)
            with contextlib.suppress(OSError):
                study.rmdir()  # only when empty
    return removed


def _remove_series(data: Path, series: Path, cutoff: float) -> bool:
    """Move *series* out of incoming/ and delete it; an instance stored meanwhile goes back, never lost."""
    trash = data / EXPIRED / uuid.uuid4().hex
    trash.parent.mkdir(exist_ok=True)
    try:
        os.rename(series, trash)
    except OSError:
        return False
    for path in trash.iterdir():
        if path.stat().st_mtime > cutoff:  # stored between the check and the rename: it stays
            series.mkdir(parents=True, exist_ok=True)
            os.rename(path, series / path.name)
    shutil.rmtree(trash, ignore_errors=True)
    return True


class RetentionThread(threading.Thread):
    """Runs :func:`cleanup` every ``interval_s`` (a tenth of the retention, within 1 min … 1 h)."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        super().__init__(name="openmsk-retention", daemon=True)
        self.settings, self.store = settings, store
        self.objects = store_for(settings)
        self.interval_s = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, retention_s(settings) / 10))
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                # One web process per interval does the pass; the lock expires on its own.
                if self.store.redis.set(LOCK_KEY, "1", nx=True, ex=max(1, int(self.interval_s * 0.9))):
                    cleanup(self.settings, self.store, objects=self.objects)
            except (redis.RedisError, OSError) as exc:
                log.warning("retention pass skipped: %s", type(exc).__name__)
            self.stopped.wait(self.interval_s)

    def stop(self) -> None:
        self.stopped.set()
