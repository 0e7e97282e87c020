"""A job's files between the object store and this worker's DATA_DIR, for workers that share no disk.

On one host (no ``OPENMSK_STORAGE_URL``) the store is DATA_DIR itself and everything here does nothing but say
so (``input_via = "local"``). With an object store:

- :func:`ensure_input` fetches the job's input (an SCP series folder, or an upload) into the worker's own
  DATA_DIR through a :class:`~openmsk.objectstore.FetchCache` (streamed, SHA-256-checked, kept within
  ``OPENMSK_STORAGE_CACHE_MB``), before the load stage;
- :func:`publish_outputs` puts the job's output folder into the store before the job is DELIVERING, so the
  web serves results.zip and a delivery on another worker finds the files;
- :func:`ensure_results` fetches the recorded DICOM results for a delivery that runs on another worker.

Failures are the job's: a missing or corrupt object is INPUT_MISSING (permanent: the data is gone); a store
that does not answer is a ``dramatiq.Retry`` after the job's ``waiting`` line says why, so jobs wait for the
store and go on when it is back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import dramatiq

from openmsk.config import Settings
from openmsk.jobs import ErrorCode, Job, JobStore
from openmsk.objectstore import FetchCache, ObjectMissing, ObjectStore, StorageError, store_for
from worker.errors import JobFailure

log = logging.getLogger("openmsk.worker")

STORE_RETRY_MS = 5000  # how soon a job that found the store down is tried again
MB = 1024 * 1024


class JobTransfer:
    """The object store and this worker's fetch cache, made once per worker process."""

    def __init__(self, settings: Settings, objects: ObjectStore | None = None) -> None:
        self.data_path = settings.data_path
        self.objects = objects if objects is not None else store_for(settings)
        self.cache = FetchCache(self.objects, self.data_path, settings.storage_cache_mb * MB)

    def ensure_input(self, jobs: JobStore, job: Job) -> Literal["local", "object-store"]:
        """Make the job's input (its series folder, or its stored upload) present under this DATA_DIR.

        Returns how it got there, for the job record's ``input_via``.
        """
        if self.objects.shared_disk:
            return "local"
        try:
            self.cache.ensure([job.input_path])
        except ObjectMissing as exc:
            raise JobFailure(
                ErrorCode.INPUT_MISSING,
                f"the job's input is not in the object store, or damaged: {exc}",
                "Send the series again; check the object store's retention and health.",
            ) from None
        except StorageError as exc:
            self._wait(jobs, job.id, f"the object store is unavailable: {exc}")
        if job.waiting:
            jobs.update(job.id, lambda j: setattr(j, "waiting", ""))
        return "object-store"

    def publish_outputs(self, jobs: JobStore, job: Job, out_dir: Path) -> None:
        """Put the job's output folder into the object store (nothing to do on one host)."""
        if self.objects.shared_disk:
            return
        try:
            self.objects.put_tree(out_dir.relative_to(self.data_path).as_posix(), out_dir)
        except StorageError as exc:
            self._wait(jobs, job.id, f"the results cannot be stored: {exc}")

    def ensure_results(self, jobs: JobStore, job: Job) -> None:
        """Fetch the recorded DICOM results a delivery needs where another worker made them."""
        if self.objects.shared_disk:
            return
        missing = [r.path for r in job.results if not (self.data_path / r.path).is_file()]
        if not missing:
            return
        try:
            self.cache.ensure(missing)
        except ObjectMissing as exc:
            raise JobFailure(
                ErrorCode.DELIVERY_FAILED,
                f"result file(s) are not in the object store: {exc}",
                "Run the job again (retention may have removed its outputs).",
            ) from None
        except StorageError as exc:
            self._wait(jobs, job.id, f"the object store is unavailable: {exc}")

    @staticmethod
    def _wait(jobs: JobStore, job_id: str, reason: str) -> None:
        """Say in the job why it waits, and have Dramatiq bring it back (its bookkeeping requeues it)."""
        log.warning("job %s waits: %s", job_id, reason)
        jobs.update(job_id, lambda j: setattr(j, "waiting", reason))
        raise dramatiq.Retry(delay=STORE_RETRY_MS)
