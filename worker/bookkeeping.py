"""Job bookkeeping as Dramatiq middleware: the job record follows its messages, so actors stay small.

Around every message of the node's actors (:data:`JOB_ACTORS`) :class:`JobBookkeeping`

- before: skips the message when its job is finished, in another stage, or superseded by a newer job of the
  same series and model (marked SUPERSEDED: the supersede rule of :mod:`scp.dispatch`); otherwise moves a
  segmentation job to RUNNING (which counts the attempt) and records the worker;
- after a failure: when Dramatiq's ``Retries`` gave up (``message.failed``), fails the job with the error's
  code — a :class:`~worker.errors.JobFailure`'s own, TIMEOUT for the time limit, PIPELINE_ERROR or
  DELIVERY_FAILED for anything unexpected — and otherwise puts a segmentation job back to QUEUED for its retry.

``Retry`` raised by an actor means "not finished, come back later": a delivery waiting for its images or
backing off keeps its state; a segmentation waiting for its input (the object store is down) is QUEUED
again. Whether an error is retried is the actors' ``retry_when`` option (:func:`retry_segmentation`), so
permanent failures never wait out a backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.middleware import SkipMessage
from dramatiq.middleware.time_limit import TimeLimitExceeded

from openmsk.heartbeat import worker_id
from openmsk.jobs import ErrorCode, JobNotFound, JobState, JobStore, superseded_by
from openmsk.queue import DELIVER_ACTOR, SEGMENT_ACTOR, SEGMENT_URGENT_ACTOR
from worker.errors import JobFailure

log = logging.getLogger("openmsk.worker")

SEGMENT_ACTORS = frozenset({SEGMENT_ACTOR, SEGMENT_URGENT_ACTOR})
JOB_ACTORS = SEGMENT_ACTORS | {DELIVER_ACTOR}
MAX_RETRIES = 3  # transient faults (OOM, a crashed process) before the job fails


def retry_segmentation(retries: int, exc: BaseException) -> bool:
    """Dramatiq ``retry_when`` of the segmentation actors: transient errors up to :data:`MAX_RETRIES` times."""
    if isinstance(exc, dramatiq.Retry):
        return True
    if isinstance(exc, TimeLimitExceeded) or (isinstance(exc, JobFailure) and exc.permanent):
        return False
    return retries < MAX_RETRIES


def retry_delivery(retries: int, exc: BaseException) -> bool:
    """``retry_when`` of the delivery actor: it reschedules itself with ``Retry``; any other error is final."""
    return isinstance(exc, dramatiq.Retry)


def as_failure(exc: BaseException, actor_name: str) -> JobFailure:
    """The job error an exception stands for."""
    if isinstance(exc, JobFailure):
        return exc
    if isinstance(exc, TimeLimitExceeded):
        return JobFailure(
            ErrorCode.TIMEOUT,
            "the job ran longer than the time limit (OPENMSK_JOB_TIME_LIMIT_S) and was stopped",
            "Raise OPENMSK_JOB_TIME_LIMIT_S for very large series, or check the worker's device.",
        )
    if actor_name == DELIVER_ACTOR:
        return JobFailure(
            ErrorCode.DELIVERY_FAILED,
            f"delivery stopped with an unexpected {type(exc).__name__}: {exc}",
            "The node's log has the details; the results are kept on the node.",
        )
    return JobFailure(
        ErrorCode.PIPELINE_ERROR,
        f"unexpected {type(exc).__name__} in the pipeline",
        "The node's log has the details; retry the job or report it.",
    )


class JobBookkeeping(dramatiq.Middleware):
    """Keeps each job's record in step with its messages (see the module docstring)."""

    def __init__(self, store: Callable[[], JobStore]) -> None:
        self.store = store

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if message.actor_name not in JOB_ACTORS:
            return
        jobs = self.store()
        job_id = message.args[0]
        try:
            job = jobs.get(job_id)
        except JobNotFound:
            log.warning("job %s is gone (purged); message skipped", job_id)
            raise SkipMessage() from None
        wanted = JobState.DELIVERING if message.actor_name == DELIVER_ACTOR else None
        if job.terminal or (wanted is not None and job.state is not wanted):
            raise SkipMessage()
        if wanted is None and job.state is JobState.DELIVERING:
            log.info("job %s is delivering already; segmentation not repeated", job_id)
            raise SkipMessage()
        newer = superseded_by(jobs.redis, job)
        if newer is not None:
            jobs.fail(
                job_id,
                ErrorCode.SUPERSEDED,
                f"job {newer} for the same series and model replaces this one",
                "Instances arrived after this job was queued; follow the newer job.",
            )
            log.info("job %s superseded by %s; not %s", job_id, newer, "delivered" if wanted else "run")
            raise SkipMessage()
        if wanted is None:
            jobs.transition(job_id, JobState.RUNNING, lambda j: setattr(j, "worker", worker_id()))

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if message.actor_name not in JOB_ACTORS or exception is None:
            return
        job_id = message.args[0]
        jobs = self.store()
        if isinstance(exception, dramatiq.Retry):
            if (
                message.actor_name in SEGMENT_ACTORS
            ):  # waiting for its input (object store down): queued again
                jobs.transition(job_id, JobState.QUEUED)
            return
        if message.failed:
            failure = as_failure(exception, message.actor_name)
            jobs.fail(job_id, failure.code, failure.message, failure.hint)
            log.warning("job %s failed: %s", job_id, failure.code.value)
        elif message.actor_name in SEGMENT_ACTORS:
            jobs.transition(job_id, JobState.QUEUED)  # Dramatiq's Retries sends it again with backoff
