"""The job record and its store in Redis — the one place that defines what a job is.

The SCP and the web create jobs, the worker moves them through their stages, the web reads them. All of them go
through :class:`JobStore`, which checks every state change against :data:`TRANSITIONS` inside a Redis
transaction, so two processes can never leave a job in a state the graph does not allow.

Files are referred to by paths relative to ``DATA_DIR``: the same record is valid in a container and on the host.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Literal

import redis
from pydantic import BaseModel, Field, field_validator

from openmsk import audit
from openmsk.audit import AuditLog

KEY_PREFIX = "openmsk:job:"
INDEX_ALL = "openmsk:jobs"
INDEX_STATE = "openmsk:jobs:state:"
# Hash naming the newest job of a (series, model): written by the SCP, read by the worker to skip stale jobs.
LATEST_PREFIX = "openmsk:series-latest:"


class JobState(StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"


# Any non-terminal state may go back to RUNNING: a message redelivered after a worker died starts the job over
# (jobs are idempotent). FAILED may be queued again by an operator; DONE is final.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset({JobState.QUEUED, JobState.FAILED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.RUNNING, JobState.QUEUED, JobState.DELIVERING, JobState.FAILED}),
    JobState.DELIVERING: frozenset({JobState.RUNNING, JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED}),
}

STAGES = ("load", "preprocess", "infer", "postprocess", "write", "analyse", "deliver")


class ErrorCode(StrEnum):
    """Error codes a job can end with; the seed service's codes plus the node's own."""

    GPU_OOM = "GPU_OOM"
    TIMEOUT = "TIMEOUT"
    INVALID_FORMAT = "INVALID_FORMAT"
    FILE_NOT_FOUND = "FILE_NOT_FOUND"
    DICOM_ERROR = "DICOM_ERROR"
    UNSUPPORTED_GEOMETRY = "UNSUPPORTED_GEOMETRY"
    MODEL_ERROR = "MODEL_ERROR"
    SEGMENTATION_FAILED = "SEGMENTATION_FAILED"
    SUPERSEDED = "SUPERSEDED"
    ANALYSIS_FAILED = "ANALYSIS_FAILED"
    DELIVERY_FAILED = "DELIVERY_FAILED"
    ARCHIVE_FAILED = "ARCHIVE_FAILED"
    INPUT_MISSING = "INPUT_MISSING"
    CONFIG_ERROR = "CONFIG_ERROR"
    PIPELINE_ERROR = "PIPELINE_ERROR"
    T2_PARAMETERS_MISSING = "T2_PARAMETERS_MISSING"  # a warning: T2 skipped, the rest delivered


class InvalidTransition(Exception):
    """A state change the job graph does not allow."""


class JobNotFound(KeyError):
    """No job with that id."""


def _relative_path(value: str) -> str:
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or not value:
        raise ValueError(f"path must be relative to DATA_DIR without '..': {value!r}")
    return str(path)


class JobError(BaseModel):
    code: ErrorCode
    message: str
    hint: str = ""


class StageTiming(BaseModel):
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


class Delivery(BaseModel):
    """The results' delivery to one destination. ``waiting``: the source images are not there yet."""

    status: Literal["pending", "waiting", "retrying", "done", "failed"] = "pending"
    attempts: int = 0
    last_error: str = ""
    updated_at: float = Field(default_factory=time.time)


class ResultInstance(BaseModel):
    """One DICOM result the pipeline wrote (SEG, SR), recorded so delivery never re-reads or guesses files."""

    path: str = Field(description="the file, relative to DATA_DIR")
    sop_class_uid: str
    sop_instance_uid: str

    @field_validator("path")
    @classmethod
    def _path_relative(cls, value: str) -> str:
        return _relative_path(value)


class Provenance(BaseModel):
    node_version: str = ""
    model_name: str = ""
    model_version: str = ""
    weights_sha256: dict[str, str] = Field(default_factory=dict)
    torch_version: str = ""
    nnunetv2_version: str = ""
    device: str = ""


class Job(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    source: Literal["scp", "upload"]
    calling_ae: str | None = None
    study_uid: str = ""
    series_uid: str = ""
    sop_uids: list[str] = Field(default_factory=list)
    model: str
    priority: Literal["urgent", "default"] = "default"
    destinations: list[str] = Field(
        default_factory=list, description="destination names from the routing rule"
    )
    archive: list[str] = Field(
        default_factory=list,
        description="destinations the source images are forwarded to; results wait for them there",
    )
    input_path: str = Field(description="folder or file of the input, relative to DATA_DIR")
    state: JobState = JobState.RECEIVED
    stage: str | None = None
    percent: float = 0.0
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    state_times: dict[str, float] = Field(default_factory=dict)
    stages: dict[str, StageTiming] = Field(default_factory=dict)
    attempts: int = 0
    worker: str | None = Field(None, description="id of the worker that ran the latest attempt")
    error: JobError | None = None
    warnings: list[JobError] = Field(
        default_factory=list, description="what was skipped in a job that still finished (done with warnings)"
    )
    t2: bool = Field(True, description="compute T2 when the series is multi-echo (routing rule option t2)")
    t2_parameters: dict[str, float] = Field(
        default_factory=dict, description="qDESS parameters the header may lack (routing rule t2_parameters)"
    )
    t2_skip_first_echo: bool = Field(
        False, description="MESE: fit T2 without echo 1 (routing rule option t2_skip_first_echo)"
    )
    files: list[str] = Field(default_factory=list)
    input_via: Literal["", "local", "object-store"] = Field(
        "", description="how the worker got the input: on its own disk, or fetched from the object store"
    )
    results: list[ResultInstance] = Field(
        default_factory=list, description="the DICOM results to deliver, recorded when the pipeline ends"
    )
    waiting: str = Field(
        "", description="why the job waits, when it waits for something other than a free worker (one line)"
    )
    deliveries: dict[str, Delivery] = Field(default_factory=dict)
    provenance: Provenance = Field(default_factory=Provenance)
    idempotency_key: str | None = None

    @field_validator("input_path")
    @classmethod
    def _input_relative(cls, value: str) -> str:
        return _relative_path(value)

    @field_validator("files")
    @classmethod
    def _files_relative(cls, value: list[str]) -> list[str]:
        return [_relative_path(item) for item in value]

    @property
    def instance_count(self) -> int:
        return len(self.sop_uids)

    @property
    def terminal(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED)


class JobStore:
    """Jobs in Redis: one JSON document per job plus sorted-set indexes by creation time and by state."""

    def __init__(self, client: redis.Redis, audit: AuditLog | None = None) -> None:
        self.redis = client
        self.audit = audit  # None: the process's installed one, if any (openmsk.audit.install)

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(redis.Redis.from_url(url))

    def create(self, job: Job) -> Job:
        """Store a new job; an existing id is an error (ids are never reused)."""
        job.state_times.setdefault(job.state.value, job.created_at)
        with self.redis.pipeline() as pipe:
            pipe.set(KEY_PREFIX + job.id, job.model_dump_json(), nx=True)
            pipe.zadd(INDEX_ALL, {job.id: job.created_at})
            pipe.zadd(INDEX_STATE + job.state.value, {job.id: job.created_at})
            created, *_ = pipe.execute()
        if not created:
            raise ValueError(f"job {job.id} already exists")
        if log := self.audit or audit.installed():
            audit.job_created(
                log,
                job_id=job.id,
                source=job.source,
                calling_ae=job.calling_ae,
                study_uid=job.study_uid,
                series_uid=job.series_uid,
                count=job.instance_count,
                model=job.model,
            )
        return job

    def get(self, job_id: str) -> Job:
        raw = self.redis.get(KEY_PREFIX + job_id)
        if raw is None:
            raise JobNotFound(job_id)
        return Job.model_validate_json(raw)

    def update(self, job_id: str, change: Callable[[Job], None]) -> Job:
        """Apply ``change`` to the job atomically (optimistic WATCH/MULTI, retried on a concurrent write).

        ``change`` mutates the job in place and may raise to abort; state changes must go through
        :meth:`transition` inside it so the graph is checked.
        """
        key = KEY_PREFIX + job_id
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(job_id)
                    job = Job.model_validate_json(raw)
                    before = job.state
                    delivered = {name for name, d in job.deliveries.items() if d.status == "done"}
                    change(job)
                    job.updated_at = time.time()
                    pipe.multi()
                    pipe.set(key, job.model_dump_json())
                    if job.state != before:
                        pipe.zrem(INDEX_STATE + before.value, job.id)
                        pipe.zadd(INDEX_STATE + job.state.value, {job.id: job.created_at})
                    pipe.execute()
                except redis.WatchError:
                    continue
                self._audit_update(before, delivered, job)
                return job

    def _audit_update(self, before: JobState, delivered: set[str], job: Job) -> None:
        """The audit lines of one committed update: the job finished, results reached a destination."""
        log = self.audit or audit.installed()
        if log is None:
            return
        for name, delivery in job.deliveries.items():
            if delivery.status == "done" and name not in delivered:
                audit.results_delivered(
                    log,
                    job_id=job.id,
                    destination=name,
                    study_uid=job.study_uid,
                    series_uid=job.series_uid,
                    sop_uids=[r.sop_instance_uid for r in job.results],
                )
        if job.state != before and job.terminal:
            audit.job_finished(
                log,
                job_id=job.id,
                study_uid=job.study_uid,
                series_uid=job.series_uid,
                count=job.instance_count,
                model=job.model,
                error_code=(job.error.code.value if job.error else "FAILED")
                if job.state is JobState.FAILED
                else None,
            )

    def transition(self, job_id: str, state: JobState, change: Callable[[Job], None] | None = None) -> Job:
        """Move the job to ``state`` (checked against :data:`TRANSITIONS`), applying ``change`` in the same write."""

        def apply(job: Job) -> None:
            set_state(job, state)
            if change is not None:
                change(job)

        return self.update(job_id, apply)

    def progress(self, job_id: str, stage: str, percent: float) -> Job:
        """Record that ``stage`` is under way and the job as a whole is ``percent`` done."""

        def apply(job: Job) -> None:
            now = time.time()
            if job.stage != stage and job.stage in job.stages and job.stages[job.stage].finished_at is None:
                job.stages[job.stage].finished_at = now
            timing = job.stages.setdefault(stage, StageTiming())
            if timing.started_at is None or job.stage != stage:
                timing.started_at, timing.finished_at = now, None
            job.stage = stage
            job.percent = max(0.0, min(100.0, percent))

        return self.update(job_id, apply)

    def finish_stage(self, job_id: str, stage: str) -> Job:
        def apply(job: Job) -> None:
            job.stages.setdefault(stage, StageTiming(started_at=time.time())).finished_at = time.time()

        return self.update(job_id, apply)

    def fail(self, job_id: str, code: ErrorCode, message: str, hint: str = "") -> Job:
        def apply(job: Job) -> None:
            job.error = JobError(code=code, message=message, hint=hint)

        return self.transition(job_id, JobState.FAILED, apply)

    def list(self, state: JobState | None = None, offset: int = 0, limit: int = 50) -> list[Job]:
        """Jobs newest first, optionally only those in ``state``."""
        index = INDEX_ALL if state is None else INDEX_STATE + state.value
        ids = self.redis.zrevrange(index, offset, offset + limit - 1)
        raws = self.redis.mget([KEY_PREFIX + i.decode() for i in ids]) if ids else []
        return [Job.model_validate_json(raw) for raw in raws if raw is not None]

    def count(self, state: JobState | None = None) -> int:
        return int(self.redis.zcard(INDEX_ALL if state is None else INDEX_STATE + state.value))

    def counts_by_state(self) -> dict[str, int]:
        return {state.value: self.count(state) for state in JobState}


def set_state(job: Job, state: JobState) -> None:
    """Change ``job.state`` in memory if the graph allows it; raise :class:`InvalidTransition` otherwise."""
    if state not in TRANSITIONS[job.state]:
        raise InvalidTransition(f"job {job.id}: {job.state.value} → {state.value} is not allowed")
    if state is JobState.RUNNING:
        job.attempts += 1
    if state is JobState.QUEUED:
        job.error = None
    job.state = state
    job.state_times[state.value] = time.time()


def latest_key(job: Job) -> str:
    return f"{LATEST_PREFIX}{job.series_uid}:{job.model}"


def superseded_by(client: redis.Redis, job: Job) -> str | None:
    """The id of a newer job of the same (series, model) that supersedes ``job``; None when it is the latest.

    Instances that arrive after a series' job was queued start a new job covering every instance; the older
    job is then superseded and a worker skips it.
    """
    if not job.series_uid:
        return None
    latest = client.hget(latest_key(job), "job")
    if latest is None:
        return None
    latest_id = latest.decode()
    return None if latest_id == job.id else latest_id
