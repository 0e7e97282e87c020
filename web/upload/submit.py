"""Submitting an upload: the model, the job record, the archive order for its images, the queue.

:func:`submit` is the one path of both ``POST /api/jobs`` and the upload form: receive (``web.upload.receive``),
inspect and store (``web.upload.inspect``), then

1. the job (state received) with a fresh id of ours, ``source="upload"``, the series' UIDs; results go to
   Orthanc when there is one and the input is DICOM (a volume gives no DICOM results);
2. for a DICOM series with Orthanc configured, ``job.archive = ["orthanc"]`` and a
   :class:`~openmsk.forwarding.ForwardOrder` for its instances in the outbox (``DATA_DIR/forward/``), written
   durably before the job is queued: the forwarder sends the images, and the worker delivers the results only
   once they are there. The order is the same for a resend of the same instances (its id), so the outbox holds
   it once;
3. the job queued (``openmsk.queue.enqueue_job``).

Every refusal removes the upload folder (and an order already written), so a refused upload leaves nothing
behind.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from dramatiq.brokers.redis import RedisBroker
from werkzeug.datastructures import MultiDict

from openmsk.config import Settings
from openmsk.forwarding import ForwardOrder, ForwardOutbox
from openmsk.jobs import ErrorCode, Job, JobState, JobStore
from openmsk.models.registry import RegistryError, model_statuses
from openmsk.objectstore import LocalStore, ObjectStore, StorageError
from openmsk.queue import enqueue_job
from web.errors import RequestError
from web.upload.inspect import StoredInput, store_input
from web.upload.receive import receive

log = logging.getLogger("openmsk.web.upload")

ARCHIVE = "orthanc"  # the archive an upload's DICOM images are forwarded to, when configured


def uploads_root(settings: Settings) -> Path:
    return settings.data_path / "uploads"


def offered_models(settings: Settings) -> list[dict[str, Any]]:
    """The registry's models as ``/api/models`` lists them; 503 when the registry itself is unreadable."""
    try:
        return model_statuses(settings)
    except RegistryError as exc:
        raise RequestError(
            503,
            "NO_MODELS",
            f"The model registry cannot be read: {exc}",
            "Install a model: `openmsk models install` or `openmsk models train-demo`.",
        ) from None


def resolve_model(settings: Settings, requested: str | None) -> str:
    """The model a job will use: the one asked for (it must be offered and usable), else the default."""
    models = offered_models(settings)
    if not requested:
        requested = next((m["name"] for m in models if m["default"]), None)
        if requested is None:
            raise RequestError(
                503,
                "NO_MODELS",
                "No segmentation model is installed.",
                "Install one: `openmsk models install`.",
            )
    model = next((m for m in models if m["name"] == requested), None)
    if model is None:
        names = ", ".join(m["name"] for m in models) or "none"
        raise RequestError(
            400,
            "UNKNOWN_MODEL",
            f"There is no model called {requested!r}.",
            f"Choose one of: {names} (GET /api/models).",
        )
    if model["status"] != "ok":
        raise RequestError(
            409,
            "MODEL_UNAVAILABLE",
            f"Model {requested!r} cannot be used: {model['status']}",
            "Choose another model or repair this one (`openmsk models list`).",
        )
    return requested


def new_upload_folder(settings: Settings) -> tuple[str, Path]:
    """A fresh job id and its upload folder (created; the id is ours, never the client's)."""
    job_id = uuid.uuid4().hex
    folder = uploads_root(settings) / job_id
    folder.mkdir(parents=True)
    return job_id, folder


def forward_order(settings: Settings, folder: Path, stored: StoredInput) -> ForwardOrder | None:
    """The archive order for a stored upload: its DICOM instances to Orthanc; ``None`` without either."""
    if stored.kind != "dicom" or not settings.orthanc_url or not stored.files:
        return None
    return ForwardOrder(
        study_uid=stored.study_uid,
        series_uid=stored.series_uid,
        folder=str((folder / stored.name).relative_to(settings.data_path)),
        files=stored.files,
        destinations=[ARCHIVE],
        source="upload",
    )


def publish_input(objects: ObjectStore, settings: Settings, input_path: str) -> None:
    """Put an upload's stored input (a series folder or one volume file) where a worker on any host finds it.

    Raises a 503 :class:`RequestError` while the store cannot take it: the upload is refused whole.
    """
    if objects.shared_disk:
        return
    local = settings.data_path / input_path
    try:
        if local.is_dir():
            objects.put_tree(input_path, local)
        else:
            objects.put_file(input_path, local)
    except StorageError as exc:
        log.warning("upload input %s not stored: %s", input_path, exc)
        raise RequestError(
            503,
            "STORAGE_UNAVAILABLE",
            "The node's object store cannot take the upload right now.",
            "Upload the files again in a few minutes; the node's /health shows the store's state.",
        ) from None


def submit(
    environ: dict[str, Any],
    settings: Settings,
    store: JobStore,
    broker: RedisBroker,
    check_form: Callable[[MultiDict[str, str]], None] | None = None,
    objects: ObjectStore | None = None,
) -> Job:
    """Receive one upload, store its input, create the job, order its images archived, and queue it.

    ``check_form`` runs on the parsed form before anything is inspected (the pages check their CSRF field
    there). Any refusal removes the upload folder before the error propagates, so nothing is left behind.
    ``objects`` is where workers read inputs: with an object store the stored input is put there before the
    job exists (a store that is down refuses the upload with 503, nothing kept).
    """
    job_id, folder = new_upload_folder(settings)
    order: ForwardOrder | None = None
    outbox: ForwardOutbox | None = None
    try:
        received = receive(environ, settings, folder)
        if check_form is not None:
            check_form(received.form)
        model = resolve_model(settings, received.form.get("model"))
        stored = store_input(folder, received.files, settings, received.form.get("series_uid") or None)
        # Results go to Orthanc when there is one and the input is DICOM (a volume gives no DICOM results).
        destinations = ["orthanc"] if settings.orthanc_url and stored.kind == "dicom" else []
        order = forward_order(settings, folder, stored)
        job = Job(
            id=job_id,
            source="upload",
            model=model,
            input_path=str(folder.relative_to(settings.data_path) / stored.name),
            destinations=destinations,
            archive=list(order.destinations) if order else [],
            study_uid=stored.study_uid,
            series_uid=stored.series_uid,
            sop_uids=stored.sop_uids,
        )
        publish_input(objects or LocalStore(settings.data_path), settings, job.input_path)
        store.create(job)  # received: no worker sees it before it is queued
        if order is not None:
            outbox = ForwardOutbox(settings.data_path)
            try:
                outbox.put(order)
            except OSError:
                store.fail(
                    job.id, ErrorCode.ARCHIVE_FAILED, "the images could not be recorded for the archive"
                )
                raise RequestError(
                    507,
                    "ARCHIVE_UNAVAILABLE",
                    "The node could not record the images for the archive.",
                    "Check the node's disk (DATA_DIR/forward) and upload the files again.",
                ) from None
    except BaseException:
        if outbox is not None and order is not None:
            outbox.remove(order)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    job = store.transition(job.id, JobState.QUEUED)
    try:
        enqueue_job(broker, job)
    except redis.RedisError:
        store.fail(job.id, ErrorCode.PIPELINE_ERROR, "the job could not be queued", "Upload the file again.")
        raise
    log.info(
        "upload %s queued: %s, %d bytes, %d instance(s), model %s%s",
        job_id,
        stored.kind,
        received.size,
        len(stored.sop_uids),
        model,
        f", images ordered to {', '.join(order.destinations)}" if order else "",
    )
    return job
