"""From a complete series to queued jobs: routing, one job per (series, model), idempotent, never lost.

Flow for each complete series (:meth:`Dispatcher.series_complete`):

1. The series' instances on disk are listed; the routing rules decide (models + destinations, or ignore).
2. For each model a :class:`~openmsk.jobs.Job` is built and first written to the **outbox**
   (``DATA_DIR/spool/<job id>.json``, atomic and fsync'd), then the series is marked as evaluated in the
   **ledger** (``DATA_DIR/scp/series/<study>/<series>.json``). From here on nothing can be lost.
   Before either, the series' archive destinations (the rule's ``archive``, default Orthanc, less the
   destination the series came from) get a :class:`~openmsk.forwarding.ForwardOrder` in the forward outbox:
   the images go there as received, and the jobs' results wait for them there (:mod:`forwarder`).
3. The outbox is drained into Redis: idempotency check, ``JobStore.create``, ``QUEUED``, Dramatiq message.
   A record leaves the outbox only after its message was sent. While Redis is unreachable the records wait
   and a background thread retries every second, so a Redis outage delays jobs but never drops one, and the
   SCP keeps receiving meanwhile (dispatch runs on its own thread, never in a C-STORE handler).

Idempotency: the key is SHA-256 over the series UID, the sorted SOP Instance UIDs and the model. Sending the
same series again without changes therefore completes a new round with the same key, and no second job is made
(the key → job id mapping lives in Redis under ``openmsk:idem:<key>``).

Supersede rule: instances that arrive for a series after its job was queued start a new round; the new round's
job covers *every* instance of the series on disk (old and new), so its key differs and a new job is queued.
That job **supersedes** the earlier ones of the same (series, model):
``openmsk:series-latest:<series>:<model>`` names the newest job, and :func:`openmsk.jobs.superseded_by` tells a worker
whether the job it holds is still the latest — a superseded job should be skipped (not started, or not
delivered). The SCP does not cancel the earlier job itself (it may already be running). Each job's
``sop_uids`` lists exactly the instances it covers: the series folder may hold more by the time a superseded
job runs, so a worker should read only ``<input_path>/<sop_uid>.dcm`` for the UIDs of its job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from forwarder import Forwarder
from openmsk.atomic import write_atomic
from openmsk.forwarding import ForwardOrder, instances_digest
from openmsk.jobs import Job, JobNotFound, JobState, JobStore, latest_key
from openmsk.objectstore import LocalStore, ObjectStore, StorageError
from openmsk.spool import JOB_SPOOL, RecordFolder
from scp.completion import PendingSeries
from scp.routing import Decision, RoutingRules, SeriesInfo
from scp.storage import SUFFIX, InstanceStore

LOG = logging.getLogger("openmsk.scp")

LEDGER = "scp/series"
IDEMPOTENCY_PREFIX = "openmsk:idem:"
SENT_PREFIX = "openmsk:scp:sent:"
KEY_TTL_S = 30 * 24 * 3600  # idempotency keys and "sent" marks are kept 30 days
RETRY_S = 1.0

# Set the "latest job" of a (series, model) only if this job is not older than the one recorded.
_SET_LATEST = """
local current = redis.call('HGET', KEYS[1], 'created_at')
if (not current) or tonumber(current) <= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'job', ARGV[1], 'created_at', ARGV[2])
  return 1
end
return 0
"""

REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


def idempotency_key(series_uid: str, sop_uids: list[str], model: str) -> str:
    """SHA-256 over the series UID, the sorted SOP Instance UIDs and the model name."""
    digest = hashlib.sha256()
    digest.update(f"{series_uid}\n{model}\n".encode())
    digest.update("\n".join(sorted(sop_uids)).encode())
    return digest.hexdigest()


class Ledger:
    """Which series (with which set of instances) were already evaluated; read at start-up."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / LEDGER

    def _path(self, study_uid: str, series_uid: str) -> Path:
        return self.root / study_uid / f"{series_uid}.json"

    def evaluated(self, study_uid: str, series_uid: str, sop_uids: list[str]) -> bool:
        """True if exactly this set of instances of the series was evaluated before."""
        try:
            record = json.loads(self._path(study_uid, series_uid).read_text())
        except (OSError, ValueError):
            return False
        return record.get("instances_digest") == instances_digest(sop_uids)

    def record(
        self, series: SeriesInfo, sop_uids: list[str], outcome: str, rule: str | None, jobs: list[Job]
    ) -> None:
        record = {
            "study_uid": series.study_uid,
            "series_uid": series.series_uid,
            "instances": len(sop_uids),
            "instances_digest": instances_digest(sop_uids),
            "outcome": outcome,
            "rule": rule,
            "jobs": {job.model: job.id for job in jobs},
            "evaluated_at": time.time(),
        }
        write_atomic(self._path(series.study_uid, series.series_uid), json.dumps(record).encode())


class Outbox:
    """Jobs waiting to be queued in Redis, one JSON file each under ``DATA_DIR/spool/``."""

    def __init__(self, data_dir: Path) -> None:
        self.records = RecordFolder(data_dir / JOB_SPOOL, Job)
        self.root = self.records.root

    def put(self, job: Job) -> None:
        self.records.write(job.id, job)

    def jobs(self) -> list[Job]:
        """Waiting jobs, oldest first (unreadable files are moved aside, not retried forever)."""
        return self.records.read_all()

    def remove(self, job_id: str) -> None:
        self.records.delete(job_id)

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class DispatchResult:
    """What became of one complete series."""

    series: SeriesInfo
    sop_uids: list[str]
    rule: str | None
    jobs: list[Job]
    completed_at: float
    archive: list[str] = field(default_factory=list)

    @property
    def ignored(self) -> bool:
        return not self.jobs


class Dispatcher:
    """Turns complete series into queued jobs (see the module docstring); owns the outbox drain thread."""

    def __init__(
        self,
        data_dir: Path,
        store: InstanceStore,
        rules: RoutingRules,
        redis_url: str,
        on_queued: Callable[[Job], None] | None = None,
        forwarder: Forwarder | None = None,
        archive_default: list[str] | None = None,
        objects: ObjectStore | None = None,
    ) -> None:
        from openmsk.queue import make_broker

        self.data_dir = data_dir
        self.store = store
        self.rules = rules
        self.forwarder = forwarder
        self.archive_default = list(archive_default or [])
        # Where workers read a job's input: DATA_DIR itself on one host, else an object store (published to
        # before the job is queued, so a worker on another host finds every instance it names).
        self.objects = objects or LocalStore(data_dir)
        self.store_up = True
        self.ledger = Ledger(data_dir)
        self.outbox = Outbox(data_dir)
        # Fail fast while Redis is down (the outbox retries); the default client would retry with back-off.
        self.redis = redis.Redis.from_url(
            redis_url, socket_connect_timeout=2, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )
        self.jobs = JobStore(self.redis)
        self.broker = make_broker(redis_url)
        self._set_latest = self.redis.register_script(_SET_LATEST)
        self.on_queued = on_queued
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drain_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.redis_up = True

    # ---------------------------------------------------------------------------------------------- series

    def series_complete(self, pending: PendingSeries) -> DispatchResult:
        """Route one complete series and hand its jobs to the outbox (then try to queue them right away)."""
        header = pending.header
        sop_uids = self.store.sop_uids(header.study_uid, header.series_uid)
        info = SeriesInfo(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            modality=header.modality,
            body_part=header.body_part,
            series_description=header.series_description,
            mr_acquisition_type=header.mr_acquisition_type,
            image_type=header.image_type,
            instances=len(sop_uids),
            calling_ae=pending.calling_ae,
            called_ae=pending.called_ae,
        )
        decision = self.rules.route(info)
        rule_name = decision.rule.name if decision.rule else None
        input_path = self.store.relative_series_dir(header.study_uid, header.series_uid)
        archive = self._archive_targets(decision, info) if sop_uids else []
        if archive and self.forwarder is not None:
            # Durable before the ledger says "evaluated": a crash from here on re-evaluates to the same order.
            self.forwarder.submit(
                ForwardOrder(
                    study_uid=header.study_uid,
                    series_uid=header.series_uid,
                    folder=input_path,
                    files={uid: uid + SUFFIX for uid in sop_uids},
                    destinations=archive,
                )
            )
        jobs: list[Job] = []
        if sop_uids and not decision.ignore and decision.rule is not None:
            rule = decision.rule
            for model in rule.models:
                jobs.append(
                    Job(
                        source="scp",
                        calling_ae=pending.calling_ae or None,
                        study_uid=header.study_uid,
                        series_uid=header.series_uid,
                        sop_uids=sop_uids,
                        model=model,
                        priority=rule.priority,  # type: ignore[arg-type]
                        destinations=list(rule.destinations),
                        t2=rule.t2,
                        t2_parameters=dict(rule.t2_parameters),
                        t2_skip_first_echo=rule.t2_skip_first_echo,
                        archive=archive,
                        input_path=input_path,
                        idempotency_key=idempotency_key(header.series_uid, sop_uids, model),
                    )
                )
            for job in jobs:
                self.outbox.put(job)
        self.ledger.record(info, sop_uids, "queued" if jobs else "ignored", rule_name, jobs)
        LOG.info(
            "series %s complete: %d instance(s) from %s, rule %s → %s; archive → %s",
            header.series_uid,
            len(sop_uids),
            pending.calling_ae or "?",
            rule_name or "(none)",
            ", ".join(job.model for job in jobs) or "ignored",
            ", ".join(archive) or "-",
        )
        if jobs:
            if self.redis_up:
                self.drain()
            else:
                self._wake.set()
        return DispatchResult(info, sop_uids, rule_name, jobs, time.time(), archive)

    def _archive_targets(self, decision: Decision, info: SeriesInfo) -> list[str]:
        """The rule's archive destinations, less the one the series came from (it is not sent back)."""
        if self.forwarder is None:
            return []
        names = self.rules.archive_for(decision, self.archive_default)
        return [name for name in names if not self.forwarder.came_from(name, info.calling_ae)]

    # ------------------------------------------------------------------------------------------------ Redis

    def submit(self, job: Job) -> Job:
        """Queue one outbox job in Redis, idempotently: every step may be repeated after a failure.

        Returns the job that stands for this key — ``job`` itself, or the earlier job with the same key.
        Raises a Redis/OS error when Redis is unreachable.
        """
        key = IDEMPOTENCY_PREFIX + (job.idempotency_key or job.id)
        if not self.redis.set(key, job.id, nx=True, ex=KEY_TTL_S):
            owner = (self.redis.get(key) or b"").decode()
            if owner and owner != job.id:
                try:
                    existing = self.jobs.get(owner)
                except JobNotFound:  # the earlier job was purged: this one takes the key over
                    self.redis.set(key, job.id, ex=KEY_TTL_S)
                else:
                    LOG.info(
                        "series %s, model %s: unchanged since job %s; no new job",
                        job.series_uid,
                        job.model,
                        existing.id,
                    )
                    return existing
        try:
            current = self.jobs.get(job.id)
        except JobNotFound:
            current = self.jobs.create(job.model_copy(deep=True))
        if current.state is JobState.RECEIVED:
            current = self.jobs.transition(job.id, JobState.QUEUED)
        sent_key = SENT_PREFIX + job.id
        if current.state is JobState.QUEUED and not self.redis.exists(sent_key):
            from openmsk.queue import enqueue_job

            enqueue_job(self.broker, current)
            self.redis.set(sent_key, "1", ex=KEY_TTL_S)
            if job.series_uid:
                self._set_latest(keys=[latest_key(job)], args=[job.id, repr(job.created_at)])
            LOG.info("job %s queued: series %s, model %s", job.id, job.series_uid, job.model)
            if self.on_queued is not None:
                self.on_queued(current)
        return current

    def drain(self) -> int:
        """Queue every outbox job; stops at the first Redis failure. Returns how many are still waiting."""
        with self._drain_lock:
            waiting = self.outbox.jobs()
            for index, job in enumerate(waiting):
                if not self._publish(job):
                    self._wake.set()
                    return len(waiting) - index
                try:
                    self.submit(job)
                except REDIS_ERRORS as exc:
                    if self.redis_up:
                        LOG.warning(
                            "Redis unreachable (%s); %d job(s) wait in %s",
                            type(exc).__name__,
                            len(waiting) - index,
                            self.outbox.root,
                        )
                    self.redis_up = False
                    self._wake.set()
                    return len(waiting) - index
                self.outbox.remove(job.id)
            if not self.redis_up:
                LOG.info("Redis reachable again; spooled jobs queued")
            self.redis_up = True
            return 0

    def _publish(self, job: Job) -> bool:
        """Put the job's input into the object store (a no-op on one host); False while the store is down.

        The job then stays in the outbox and is tried again like one waiting for Redis: nothing is lost, and
        no worker is sent a job whose instances it could not fetch.
        """
        if self.objects.shared_disk:
            return True
        rels = [f"{job.input_path}/{uid}{SUFFIX}" for uid in job.sop_uids]
        try:
            stored = self.objects.upload(rels, self.data_dir)
        except StorageError as exc:
            if self.store_up:
                LOG.warning(
                    "object store unavailable (%s); job %s waits in %s", exc, job.id, self.outbox.root
                )
            self.store_up = False
            return False
        if not self.store_up:
            LOG.info("object store reachable again; waiting jobs published")
        self.store_up = True
        LOG.info(
            "job %s: %d of %d instance(s) stored in %s", job.id, stored, len(rels), self.objects.describe()
        )
        return True

    def start(self) -> None:
        """Start the thread that retries the outbox while Redis is unreachable (and drains it at start-up)."""
        self._thread = threading.Thread(target=self._run, name="scp-outbox", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._wake.set()  # drain whatever a previous run left behind
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                left = self.drain()
            except Exception:
                LOG.exception("outbox drain failed")
                left = 1
            if left:
                self._stop.wait(RETRY_S)
                self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.redis.close()
