"""Scale-out on one machine: urgent jobs overtake a backlog. (Two workers sharing the queues, each listed in
/health and each taking a job, are tested without a shared disk in tests/test_no_shared_disk.py.)"""

from __future__ import annotations

from pathlib import Path

from openmsk.config import Settings
from openmsk.jobs import JobState, JobStore
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.models.registry import load_registry
from tests.processes import openmsk, wait_for
from tests.test_worker_e2e import worker_env
from tests.worker_harness import stage_phantom, submit


def test_urgent_job_overtakes_the_backlog(
    settings: Settings, orthanc_server: ManagedOrthanc, tmp_path: Path
) -> None:
    model = load_registry(settings.model_registry).default.name
    staged = [stage_phantom(settings.data_path, seed=4300 + n)[1] for n in range(4)]
    backlog = [submit(str(settings.redis_url), settings.data_path, s, model, []) for s in staged[:3]]
    urgent = submit(str(settings.redis_url), settings.data_path, staged[3], model, [], priority="urgent")
    worker = openmsk("worker", worker_env(settings, orthanc_server), tmp_path / "worker.log")
    store = JobStore.from_url(str(settings.redis_url))
    try:
        wait_for(lambda: "running" in store.get(urgent.id).state_times, 180, "urgent job started")
        urgent_start = store.get(urgent.id).state_times["running"]
        before = [
            j.id for j in backlog if store.get(j.id).state_times.get("running", float("inf")) < urgent_start
        ]
        # At most the job the worker was already running when it saw the urgent one; FIFO would run all three first.
        assert len(before) <= 1, f"urgent waited behind {len(before)} backlog jobs"
        wait_for(lambda: store.get(urgent.id).terminal, 120, "urgent job finished")
        assert store.get(urgent.id).state is JobState.DONE
    finally:
        worker.kill()
        worker.wait(timeout=10)
