"""Retention: uploads and job outputs expire ``OPENMSK_RETENTION_HOURS`` after their job ends.

A periodic pass (a daemon thread of the web server, run by one web process at a time through a Redis
lock) removes ``DATA_DIR/uploads/<id>/`` and ``DATA_DIR/jobs/<id>/`` of every finished job past its expiry
and empties the job's ``files`` list, so the pages and the API say the files are gone instead of failing to
serve them. The job record itself stays (the list, the stats and the metrics count it), and so does
everything that was delivered: the copies in Orthanc or a PACS belong to them, and this pass never contacts
a destination.

Upload folders that never became a job (a crash mid-upload) are removed once they are older than the
retention period too.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass

import redis

from openmsk.config import Settings
from openmsk.jobs import INDEX_STATE, KEY_PREFIX, Job, JobNotFound, JobState, JobStore
from openmsk.objectstore import ObjectStore, StorageError, store_for

log = logging.getLogger("openmsk.web.retention")

LOCK_KEY = "openmsk:retention:lock"
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
    if report.jobs or report.orphans:
        log.info(
            "retention: removed the files of %d job(s) and %d orphaned upload(s)", report.jobs, report.orphans
        )
    return report


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
