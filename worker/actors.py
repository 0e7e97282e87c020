"""The worker's Dramatiq actors: small functions over the pipeline, the job store and the destinations.

``segment_job`` runs the stages and hands over to ``deliver_job``; delivery retries with its own backoff, so a
PACS that is down never blocks segmentation. Both may run more than once for a job (at-least-once delivery):
outputs and DICOM UIDs are deterministic, so a rerun replaces instead of duplicating.
"""

from __future__ import annotations

import logging
import time
from functools import cache
from pathlib import Path

import dramatiq
from dramatiq.middleware import CurrentMessage

from destinations import DeliveryError, load_destinations
from openmsk.config import Settings, load_settings
from openmsk.heartbeat import worker_id
from openmsk.jobs import Delivery, ErrorCode, Job, JobState, JobStore, superseded_by
from openmsk.models.registry import RegistryError, load_registry
from openmsk.models.segmenter import Segmenter, load_segmenter
from openmsk.queue import DELIVER_ACTOR, DELIVER_QUEUE, SEGMENT_ACTOR, SEGMENT_URGENT_ACTOR
from worker.errors import JobFailure
from worker.inputs import load_input, load_series_instances
from worker.pipeline import overall_percent, segment_volume

log = logging.getLogger("openmsk.worker")

MAX_RETRIES = 3  # transient faults (OOM, a crashed process) before the job fails
DELIVERY_BACKOFF_S = (2, 5, 10, 30, 60, 120, 300)  # then the delivery fails


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


def job_output_dir(job: Job) -> Path:
    return settings().data_path / "jobs" / job.id / "output"


def _relative(path: Path) -> str:
    return str(path.relative_to(settings().data_path))


def segment_job(job_id: str) -> None:
    """Run the stages for ``job_id`` and hand the results to :func:`deliver_job`."""
    jobs = store()
    job = jobs.get(job_id)
    if job.terminal or job.state is JobState.DELIVERING:
        log.info("job %s is %s already; nothing to do", job_id, job.state.value)
        return
    newer = superseded_by(jobs.redis, job)
    if newer is not None:
        jobs.fail(
            job_id,
            ErrorCode.SUPERSEDED,
            f"job {newer} for the same series and model replaces this one",
            "Instances arrived after this job was queued; follow the newer job.",
        )
        return
    job = jobs.transition(job_id, JobState.RUNNING, lambda j: setattr(j, "worker", worker_id()))
    log.info("job %s: series %s with %s (attempt %d)", job_id, job.series_uid, job.model, job.attempts)

    def progress(stage: str, fraction: float) -> None:
        jobs.progress(job_id, stage, overall_percent(stage, fraction))

    try:
        progress("load", 0.0)
        source = settings().data_path / job.input_path
        volume = load_series_instances(source, job.sop_uids) if job.source == "scp" else load_input(source)
        progress("load", 1.0)
        try:
            segmenter = segmenter_for(job.model)
            entry = segmenter.entry
        except (RegistryError, KeyError) as exc:
            raise JobFailure(
                ErrorCode.MODEL_ERROR, str(exc), "Choose an installed model (openmsk models)."
            ) from None
        outputs = segment_volume(
            volume, segmenter, entry, job_output_dir(job), progress, dicom_outputs=bool(volume.sources)
        )
    except Exception as exc:
        failure = exc if isinstance(exc, JobFailure) else _unexpected(exc)
        message = CurrentMessage.get_current_message()
        retries = message.options.get("retries", 0) if message is not None else MAX_RETRIES
        if failure.permanent or retries >= MAX_RETRIES:
            jobs.fail(job_id, failure.code, failure.message, failure.hint)
            log.warning("job %s failed: %s", job_id, failure.code.value)
            return
        jobs.transition(job_id, JobState.QUEUED)
        raise  # Dramatiq retries it with backoff

    def finished(j: Job) -> None:
        j.files = [_relative(p) for p in outputs.files]
        j.provenance = j.provenance.model_copy(
            update={
                "model_name": entry.name,
                "model_version": entry.version,
                "weights_sha256": dict(entry.sha256),
                "torch_version": segmenter.provenance.get("torch", ""),
                "nnunetv2_version": segmenter.provenance.get("nnunetv2", ""),
                "device": segmenter.device,
            }
        )
        j.deliveries = {name: Delivery() for name in j.destinations}
        j.percent = overall_percent("deliver", 0.0)

    jobs.transition(job_id, JobState.DELIVERING, finished)
    deliver_job.send(job_id)


_retry_options = {"max_retries": MAX_RETRIES, "min_backoff": 2000, "max_backoff": 60_000}
segment_default = dramatiq.actor(
    segment_job, actor_name=SEGMENT_ACTOR, queue_name="default", priority=10, **_retry_options
)
segment_urgent = dramatiq.actor(
    segment_job, actor_name=SEGMENT_URGENT_ACTOR, queue_name="urgent", priority=0, **_retry_options
)


# Deliveries have a queue of their own: in "default" they would wait behind every queued segmentation.
@dramatiq.actor(actor_name=DELIVER_ACTOR, queue_name=DELIVER_QUEUE, priority=5, max_retries=0)
def deliver_job(job_id: str) -> None:
    jobs = store()
    job = jobs.get(job_id)
    if job.state is not JobState.DELIVERING:
        return
    jobs.progress(job_id, "deliver", overall_percent("deliver", 0.0))
    out = job_output_dir(job)
    dicom_files = [p for p in (out / "seg.dcm", out / "sr.dcm") if p.exists()]
    sop_uids = _sop_uids(dicom_files)
    destinations = load_destinations(settings())
    waiting = False
    for name, delivery in job.deliveries.items():
        if delivery.status == "done":
            continue
        try:
            if name not in destinations:
                raise DeliveryError(f"destination {name!r} is not configured")
            destinations[name].send(dicom_files)
            destinations[name].confirm(job.study_uid, sop_uids)
            update = Delivery(status="done", attempts=delivery.attempts + 1)
        except Exception as exc:
            attempts = delivery.attempts + 1
            spent = attempts > len(DELIVERY_BACKOFF_S)
            update = Delivery(
                status="failed" if spent else "retrying",
                attempts=attempts,
                last_error=str(exc) or type(exc).__name__,
            )
            waiting = waiting or not spent
            log.warning("job %s: delivery to %s failed (attempt %d)", job_id, name, attempts)
        jobs.update(job_id, lambda j, n=name, u=update: j.deliveries.__setitem__(n, u))

    job = jobs.get(job_id)
    if waiting:
        attempts = max(d.attempts for d in job.deliveries.values() if d.status == "retrying")
        delay = DELIVERY_BACKOFF_S[min(attempts, len(DELIVERY_BACKOFF_S)) - 1]
        deliver_job.send_with_options(args=(job_id,), delay=delay * 1000)
        return
    failed = {n: d for n, d in job.deliveries.items() if d.status == "failed"}
    if failed:
        names = ", ".join(sorted(failed))
        last = next(iter(failed.values())).last_error
        jobs.fail(
            job_id,
            ErrorCode.DELIVERY_FAILED,
            f"results could not be delivered to {names}: {last}",
            "Check that the destination is reachable; the results are kept on the node.",
        )
        return

    def done(j: Job) -> None:
        j.percent = 100.0
        timing = j.stages.get("deliver")
        if timing is not None:
            timing.finished_at = time.time()

    jobs.transition(job_id, JobState.DONE, done)
    log.info("job %s done", job_id)


def _unexpected(exc: Exception) -> JobFailure:
    """An error no stage anticipated: retried (it may be transient), then reported as a pipeline error."""
    log.exception("job failed with an unexpected error")
    return JobFailure(
        ErrorCode.PIPELINE_ERROR,
        f"unexpected {type(exc).__name__} in the pipeline",
        "The node's log has the details; retry the job or report it.",
        permanent=False,
    )


def _sop_uids(files: list[Path]) -> list[str]:
    import pydicom

    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
