"""Numbers about the queue and recent jobs: queue positions, ETAs, the stats panel.

Everything is derived from the job records (``openmsk.jobs``) and the worker heartbeats, never stored twice.
ETAs use the mean processing time (running → done) of the recent finished jobs of the same model.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

import redis

from openmsk.heartbeat import live_workers
from openmsk.jobs import INDEX_STATE, Job, JobState, JobStore

RECENT_JOBS = 50  # finished jobs the means are taken from


def processing_seconds(job: Job) -> float | None:
    """How long a finished job took from its (last) start to done."""
    started, done = job.state_times.get(JobState.RUNNING.value), job.state_times.get(JobState.DONE.value)
    if started is None or done is None or done < started:
        return None
    return done - started


class RecentDurations:
    """Mean processing time per model over the last :data:`RECENT_JOBS` done jobs.

    Recomputed only when the done index changes (its size or newest entry), so a page polling every second
    costs two small Redis calls, not fifty job reads.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._key: tuple[int, bytes | None] | None = None
        self._means: dict[str, float] = {}

    def means(self) -> dict[str, float]:
        index = INDEX_STATE + JobState.DONE.value
        with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(index)
            pipe.zrevrange(index, 0, 0)
            size, newest = pipe.execute()
        key = (int(size), newest[0] if newest else None)
        with self._lock:
            if key == self._key:
                return self._means
        sums: dict[str, list[float]] = {}
        for job in self.store.list(JobState.DONE, 0, RECENT_JOBS):
            seconds = processing_seconds(job)
            if seconds is not None:
                sums.setdefault(job.model, []).append(seconds)
        means = {model: sum(values) / len(values) for model, values in sums.items()}
        with self._lock:
            self._means, self._key = means, key
        return means


def queue_position(store: JobStore, job: Job) -> int | None:
    """1 for the next queued job, 2 for the one after...; ``None`` when the job is not waiting."""
    if job.state is not JobState.QUEUED:
        return None
    rank = store.redis.zrank(INDEX_STATE + JobState.QUEUED.value, job.id)
    return None if rank is None else int(rank) + 1


def eta_seconds(
    job: Job, position: int | None, mean_s: float | None, workers: int, running: int, now: float | None = None
) -> float | None:
    """A rough time until the job is done: the jobs ahead of it spread over the workers, then its own run.

    Without a recent mean for the model, a running job extrapolates from its percent; a queued one has none.
    """
    now = time.time() if now is None else now
    if job.terminal:
        return None
    if job.state in (JobState.RUNNING, JobState.DELIVERING):
        elapsed = now - job.state_times.get(JobState.RUNNING.value, now)
        if mean_s is not None:
            return max(0.0, mean_s - elapsed)
        if job.percent >= 5:
            return elapsed * (100 - job.percent) / job.percent
        return None
    if mean_s is None:
        return None
    ahead = (position or 1) - 1 + running
    return mean_s * (ahead / max(1, workers) + 1)


def node_stats(
    store: JobStore, client: redis.Redis, durations: RecentDurations, stale_s: float
) -> dict[str, Any]:
    """The stats panel: processed today and in total, failures, queue length, workers, mean time per model."""
    midnight = datetime.now().replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    done_index = INDEX_STATE + JobState.DONE.value
    return {
        "processed_today": int(client.zcount(done_index, midnight, "+inf")),
        "processed_total": store.count(JobState.DONE),
        "failed_total": store.count(JobState.FAILED),
        "queue_length": store.count(JobState.QUEUED),
        "running": store.count(JobState.RUNNING) + store.count(JobState.DELIVERING),
        "workers": len(live_workers(client, stale_s)),
        "mean_seconds_by_model": {model: round(mean, 1) for model, mean in sorted(durations.means().items())},
    }
