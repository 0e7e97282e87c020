"""Scale-out on one machine: several worker processes share the queues; urgent jobs overtake a backlog."""

from __future__ import annotations

from pathlib import Path

from openmsk.config import Settings
from openmsk.jobs import JobState, JobStore
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.models.registry import load_registry
from tests.processes import health, openmsk, wait_for
from tests.test_worker_e2e import worker_env
from tests.worker_harness import stage_phantom, submit


def test_two_workers_take_two_jobs_and_health_lists_both(
    settings: Settings, orthanc_server: ManagedOrthanc, tmp_path: Path
) -> None:
    model = load_registry(settings.model_registry).default.name
    env = worker_env(settings, orthanc_server)
    env["OPENMSK_MIN_FREE_DISK_MB"] = "0"
    workers = [openmsk("worker", env, tmp_path / f"worker{n}.log") for n in (1, 2)]
    web = openmsk("web", env, tmp_path / "web.log")
    store = JobStore.from_url(str(settings.redis_url))
    try:
        wait_for(lambda: len(health(settings.web_port)[1]["workers"]) == 2, 60, "both workers in /health")
        listed = {w["id"] for w in health(settings.web_port)[1]["workers"]}
        assert {ident.rsplit(":", 1)[1] for ident in listed} == {str(w.pid) for w in workers}
        assert all(w["device"] == "cpu" for w in health(settings.web_port)[1]["workers"])

        staged = [stage_phantom(settings.data_path, seed=4200 + n)[1] for n in range(2)]
        jobs = [submit(str(settings.redis_url), settings.data_path, s, model, []) for s in staged]
        for job in jobs:
            wait_for(lambda j=job: store.get(j.id).terminal, 180, f"job {job.id} finished")
        done = [store.get(job.id) for job in jobs]
        assert all(j.state is JobState.DONE for j in done), [j.error for j in done]
        assert done[0].worker != done[1].worker  # prefetch 1: the second job went to the idle worker
    finally:
        for proc in (*workers, web):
            proc.kill()
            proc.wait(timeout=10)


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
