"""A job's outputs on the web's disk: fetched from the object store when a worker on another host made them.

On one host the worker writes into the same DATA_DIR and there is nothing to do. With ``OPENMSK_STORAGE_URL``
the worker puts its output folder into the store before the job is delivering; the first page or download
that needs a file fetches the whole folder (SHA-256-checked, atomic) into the web's DATA_DIR, where retention
removes it with the job like any other output.
"""

from __future__ import annotations

import logging

from openmsk.jobs import Job
from openmsk.objectstore import ObjectMissing, StorageError
from web.context import objects, settings
from web.errors import RequestError

log = logging.getLogger("openmsk.web")


def ensure_outputs(job: Job) -> None:
    """Make the job's recorded files present locally if an object store holds them (a no-op otherwise).

    A store that does not answer is a 503 naming it; outputs the store does not have (expired) are left to
    the caller, which reports them missing.
    """
    store = objects()
    data = settings().data_path
    if store.shared_disk or all((data / rel).is_file() for rel in job.files):
        return
    folders = sorted({rel.rsplit("/", 1)[0] for rel in job.files})
    for folder in folders:
        try:
            store.fetch_tree(folder, data / folder)
        except ObjectMissing:
            log.info("job %s: outputs %s not in the object store", job.id, folder)
        except StorageError as exc:
            raise RequestError(
                503,
                "STORAGE_UNAVAILABLE",
                f"The job's results are in the object store, which does not answer: {exc}",
                "Try again in a few minutes; the node's /health shows the store's state.",
            ) from None
