"""The worker's Dramatiq actors: small functions over the pipeline, the job store and the destinations.

``segment_job`` runs the stages and hands over to ``deliver_job``; delivery reschedules itself (``Retry``) while
the source images are on their way to an archive destination or a destination is down, so a PACS that is down
never blocks segmentation. The job's state around each message — skipped when finished or superseded,
RUNNING, retried, FAILED with a code — is kept by :class:`worker.bookkeeping.JobBookkeeping`. Both actors
may run more than once for a job (at-least-once delivery): outputs and DICOM UIDs are deterministic, so a
rerun replaces instead of duplicating.
"""

from __future__ import annotations

import logging
import time
from functools import cache
from pathlib import Path
from typing import Literal

import dramatiq

from destinations import Destination, load_destinations
from openmsk.config import Settings, load_settings
from openmsk.forwarding import ForwardStates, instances_digest
from openmsk.jobs import Delivery, ErrorCode, Job, JobError, JobState, JobStore, ResultInstance
from openmsk.models.registry import RegistryError, load_registry
from openmsk.queue import DELIVER_ACTOR, DELIVER_QUEUE, SEGMENT_ACTOR, SEGMENT_URGENT_ACTOR
from worker.bookkeeping import retry_delivery, retry_segmentation
from worker.errors import JobFailure
from worker.inputs import load_input, load_series_instances
from worker.models.segmenter import Segmenter, load_segmenter
from worker.pipeline import Outputs, overall_percent, segment_volume
from worker.prior import PriorLookup
from worker.transfer import JobTransfer

log = logging.getLogger("openmsk.worker")

DELIVERY_BACKOFF_S = (2, 5, 10, 30, 60, 120, 300)  # then the delivery fails
IMAGES_POLL_S = 1.0  # how often a delivery looks again whether its source images reached the archive
IMAGES_WAIT_LIMIT_S = (
    3600.0  # a delivery waits this long for its images before the job fails (ARCHIVE_FAILED)
)


@cache
def settings() -> Settings:
    return load_settings()


@cache
def store() -> JobStore:
    return JobStore.from_url(str(settings().redis_url))


@cache
def segmenter_for(name: str) -> Segmenter:
    """Load each model once per worker process and keep it for every later job."""
    entry = load_registry(settings().model_registry).get(name)
    return load_segmenter(entry, settings().device)


@cache
def transfer() -> JobTransfer:
    """The object store and this worker's fetch cache (DATA_DIR itself on one host)."""
    return JobTransfer(settings())


def job_output_dir(job: Job) -> Path:
    return settings().data_path / "jobs" / job.id / "output"


def _relative(path: Path) -> str:
    return str(path.relative_to(settings().data_path))


def segment_job(job_id: str) -> None:
    """Run the stages for ``job_id`` (already RUNNING: see the bookkeeping) and hand over to delivery."""
    jobs = store()
    job = jobs.get(job_id)
    log.info("job %s: series %s with %s (attempt %d)", job_id, job.series_uid, job.model, job.attempts)

    def progress(stage: str, fraction: float) -> None:
        jobs.progress(job_id, stage, overall_percent(stage, fraction))

    progress("load", 0.0)
    via = transfer().ensure_input(jobs, job)
    if job.input_via != via:
        jobs.update(job_id, lambda j: setattr(j, "input_via", via))
    source = settings().data_path / job.input_path
    volume = load_series_instances(source, job.sop_uids) if job.source == "scp" else load_input(source)
    progress("load", 1.0)
    try:
        segmenter = segmenter_for(job.model)
    except (RegistryError, KeyError) as exc:
        raise JobFailure(
            ErrorCode.MODEL_ERROR, str(exc), "Choose an installed model (openmsk models)."
        ) from None
    outputs = segment_volume(
        volume,
        segmenter,
        segmenter.entry,
        job_output_dir(job),
        progress,
        dicom_outputs=bool(volume.sources),
        t2=job.t2,
        t2_parameters=job.t2_parameters,
        t2_skip_first_echo=job.t2_skip_first_echo,
        priors=PriorLookup.for_job(jobs.redis, settings(), job_id),
    )
    transfer().publish_outputs(jobs, job, job_output_dir(job))
    jobs.transition(job_id, JobState.DELIVERING, lambda j: _record_outputs(j, outputs, segmenter))
    deliver_job.send(job_id)


def _record_outputs(job: Job, outputs: Outputs, segmenter: Segmenter) -> None:
    """What the pipeline wrote goes into the job record: delivery reads it from there, never from guesses."""
    entry = segmenter.entry
    job.files = [_relative(p) for p in outputs.files]
    job.results = [
        ResultInstance(
            path=_relative(result.path),
            sop_class_uid=result.sop_class_uid,
            sop_instance_uid=result.sop_instance_uid,
        )
        for result in outputs.dicom
    ]
    job.provenance = job.provenance.model_copy(
        update={
            "model_name": entry.name,
            "model_version": entry.version,
            "weights_sha256": dict(entry.sha256),
            "torch_version": segmenter.provenance.get("torch", ""),
            "nnunetv2_version": segmenter.provenance.get("nnunetv2", ""),
            "device": segmenter.device,
        }
    )
    job.deliveries = {name: Delivery() for name in job.destinations} if job.results else {}
    job.warnings = [JobError(code=w.code, message=w.message, hint=w.hint) for w in outputs.warnings]
    job.percent = overall_percent("deliver", 0.0)


_segment_options = {
    "retry_when": retry_segmentation,
    "min_backoff": 2000,
    "max_backoff": 60_000,
    "time_limit": settings().job_time_limit_s * 1000,  # then TimeLimitExceeded: the job fails with TIMEOUT
}
segment_default = dramatiq.actor(
    segment_job, actor_name=SEGMENT_ACTOR, queue_name="default", priority=10, **_segment_options
)
segment_urgent = dramatiq.actor(
    segment_job, actor_name=SEGMENT_URGENT_ACTOR, queue_name="urgent", priority=0, **_segment_options
)


# Deliveries have a queue of their own: in "default" they would wait behind every queued segmentation.
@dramatiq.actor(actor_name=DELIVER_ACTOR, queue_name=DELIVER_QUEUE, priority=5, retry_when=retry_delivery)
def deliver_job(job_id: str) -> None:
    """Send the job's recorded results to each destination; come back (``Retry``) while any is not done."""
    jobs = store()
    job = jobs.get(job_id)
    jobs.progress(job_id, "deliver", overall_percent("deliver", 0.0))
    transfer().ensure_results(jobs, job)
    files = [settings().data_path / result.path for result in job.results]
    sop_uids = [result.sop_instance_uid for result in job.results]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise JobFailure(
            ErrorCode.DELIVERY_FAILED,
            f"result file(s) {', '.join(missing)} are no longer on the node",
            "Run the job again (retention may have removed its outputs).",
        )
    try:
        destinations = load_destinations(settings())
    except ValueError as exc:
        raise JobFailure(
            ErrorCode.CONFIG_ERROR, f"destinations file unusable: {exc}", "Fix OPENMSK_DESTINATIONS."
        ) from None
    retry_in: list[float] = []
    for name, delivery in job.deliveries.items():
        if delivery.status == "done":
            continue
        if _images_at(name, job) == "waiting":
            if delivery.status != "waiting":
                jobs.update(job_id, lambda j, n=name: j.deliveries.__setitem__(n, Delivery(status="waiting")))
            retry_in.append(IMAGES_POLL_S)
            continue
        update = _deliver_to(destinations.get(name), name, delivery, files, job.study_uid, sop_uids)
        jobs.update(job_id, lambda j, n=name, u=update: j.deliveries.__setitem__(n, u))
        if update.status == "retrying":
            retry_in.append(DELIVERY_BACKOFF_S[update.attempts - 1])
        elif update.status == "failed":
            raise JobFailure(
                ErrorCode.DELIVERY_FAILED,
                f"results could not be delivered to {name}: {update.last_error}",
                "Check that the destination is reachable; the results are kept on the node.",
            )
    if retry_in:
        raise dramatiq.Retry(delay=int(min(retry_in) * 1000))

    def done(j: Job) -> None:
        j.percent = 100.0
        timing = j.stages.get("deliver")
        if timing is not None:
            timing.finished_at = time.time()

    jobs.transition(job_id, JobState.DONE, done)
    log.info("job %s done", job_id)


def _images_at(name: str, job: Job) -> Literal["arrived", "waiting"]:
    """Whether the job's source images are at archive destination ``name`` (results never precede them).

    Raises :class:`JobFailure` (ARCHIVE_FAILED) when the forwarder gave up on them or they are overdue.
    """
    if name not in job.archive:
        return "arrived"  # not archived by the node: they came from there, or go there some other way
    state = ForwardStates(store().redis).get(job.series_uid).get(name)
    current = state is not None and (not job.sop_uids or state.digest == instances_digest(job.sop_uids))
    if current and state.arrived:
        return "arrived"
    if current and state.status == "failed":
        raise JobFailure(
            ErrorCode.ARCHIVE_FAILED,
            f"the source images could not be archived to {name}: {state.last_error}",
            "The node keeps retrying the images; retry the job once the destination has them.",
        )
    since = job.state_times.get(JobState.DELIVERING.value, time.time())
    if time.time() - since > IMAGES_WAIT_LIMIT_S:
        raise JobFailure(
            ErrorCode.ARCHIVE_FAILED,
            f"the source images did not reach {name} within {IMAGES_WAIT_LIMIT_S / 60:.0f} minutes",
            "Check that the SCP or the web (which forward the images) runs and the destination is reachable.",
        )
    return "waiting"


def _deliver_to(
    destination: Destination | None,
    name: str,
    delivery: Delivery,
    files: list[Path],
    study_uid: str,
    sop_uids: list[str],
) -> Delivery:
    """One attempt at one destination: ``done``, ``retrying`` (backoff left) or ``failed``."""
    attempts = delivery.attempts + 1
    try:
        if destination is None:
            raise ValueError(f"destination {name!r} is not configured")
        destination.send(files)
        destination.confirm(study_uid, sop_uids)
        return Delivery(status="done", attempts=attempts)
    except Exception as exc:  # a destination's library may raise anything; it is this attempt's outcome
        permanent = isinstance(exc, ValueError)  # not configured: retrying cannot help
        spent = permanent or attempts > len(DELIVERY_BACKOFF_S)
        log.warning("job delivery to %s failed (attempt %d)", name, attempts)
        return Delivery(
            status="failed" if spent else "retrying",
            attempts=attempts,
            last_error=str(exc) or type(exc).__name__,
        )
