"""The job record in a real Redis: round trip, the state graph, progress, concurrent updates, listing."""

from __future__ import annotations

import threading

import pytest
import redis
from pydantic import ValidationError

from openmsk.jobs import (
    Delivery,
    ErrorCode,
    InvalidTransition,
    Job,
    JobNotFound,
    JobState,
    JobStore,
)


def make_job(**changes: object) -> Job:
    values: dict[str, object] = {
        "source": "scp",
        "calling_ae": "SCANNER1",
        "study_uid": "1.2.3",
        "series_uid": "1.2.3.4",
        "sop_uids": ["1.2.3.4.1", "1.2.3.4.2"],
        "model": "nnunet_fullres",
        "input_path": "incoming/1.2.3/1.2.3.4",
    }
    values.update(changes)
    return Job(**values)


def test_round_trip(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    job = store.create(make_job())
    loaded = store.get(job.id)
    assert loaded == job
    assert loaded.state is JobState.RECEIVED and loaded.instance_count == 2
    assert "received" in loaded.state_times
    with pytest.raises(ValueError, match="already exists"):
        store.create(job)
    with pytest.raises(JobNotFound):
        store.get("nope")


def test_paths_must_be_relative_to_data_dir() -> None:
    for bad in ("/abs/path", "incoming/../../etc", ""):
        with pytest.raises(ValidationError):
            make_job(input_path=bad)
    with pytest.raises(ValidationError):
        make_job(files=["../secret"])


def test_happy_path_transitions_and_stage_timings(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    job = store.create(make_job())
    store.transition(job.id, JobState.QUEUED)
    store.transition(job.id, JobState.RUNNING)
    store.progress(job.id, "load", 5)
    store.progress(job.id, "infer", 40)
    store.progress(job.id, "infer", 55)
    job = store.get(job.id)
    assert job.stage == "infer" and job.percent == 55
    assert job.stages["load"].duration_s is not None and job.stages["load"].duration_s >= 0
    assert job.stages["infer"].finished_at is None
    store.finish_stage(job.id, "infer")

    def delivered(j: Job) -> None:
        j.deliveries["orthanc"] = Delivery(status="done", attempts=1)
        j.files.append("jobs/x/output/seg.dcm")

    store.transition(job.id, JobState.DELIVERING)
    job = store.transition(job.id, JobState.DONE, delivered)
    assert job.state is JobState.DONE and job.attempts == 1
    assert job.deliveries["orthanc"].status == "done"
    assert set(job.state_times) == {"received", "queued", "running", "delivering", "done"}
    with pytest.raises(InvalidTransition):
        store.transition(job.id, JobState.RUNNING)


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ([], JobState.RUNNING),
        ([], JobState.DONE),
        ([JobState.QUEUED], JobState.DELIVERING),
        ([JobState.QUEUED, JobState.RUNNING], JobState.DONE),
    ],
)
def test_invalid_transitions_are_refused_and_leave_the_job_unchanged(
    redis_client: redis.Redis, path: list[JobState], bad: JobState
) -> None:
    store = JobStore(redis_client)
    job = store.create(make_job())
    for state in path:
        store.transition(job.id, state)
    before = store.get(job.id)
    with pytest.raises(InvalidTransition):
        store.transition(job.id, bad)
    assert store.get(job.id) == before


def test_redelivered_job_runs_again_and_failure_carries_code(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    job = store.create(make_job())
    store.transition(job.id, JobState.QUEUED)
    store.transition(job.id, JobState.RUNNING)
    store.transition(job.id, JobState.RUNNING)  # a second worker took the message over
    job = store.fail(job.id, ErrorCode.DICOM_ERROR, "series has uneven slices", "resend the complete series")
    assert job.attempts == 2 and job.state is JobState.FAILED
    assert job.error is not None and job.error.code is ErrorCode.DICOM_ERROR and job.error.hint
    job = store.transition(job.id, JobState.QUEUED)  # an operator retries it
    assert job.error is None


def test_listing_by_state_newest_first(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    jobs = [store.create(make_job(created_at=1000.0 + i)) for i in range(5)]
    for job in jobs[:3]:
        store.transition(job.id, JobState.QUEUED)
    assert [j.id for j in store.list()] == [j.id for j in reversed(jobs)]
    assert [j.id for j in store.list(JobState.QUEUED)] == [jobs[2].id, jobs[1].id, jobs[0].id]
    assert [j.id for j in store.list(offset=1, limit=2)] == [jobs[3].id, jobs[2].id]
    assert store.counts_by_state()["queued"] == 3 and store.counts_by_state()["received"] == 2


def test_concurrent_progress_updates_are_not_lost(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client)
    job = store.create(make_job())

    def add_files(n: int) -> None:
        own = JobStore(redis.Redis(connection_pool=redis_client.connection_pool))
        for i in range(20):
            own.update(job.id, lambda j, i=i: j.files.append(f"jobs/{n}/{i}"))

    threads = [threading.Thread(target=add_files, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.get(job.id).files) == 80
