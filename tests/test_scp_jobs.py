"""From received series to queued jobs, with real dcmtk senders and real Redis: completion rules, routing,
idempotency, supersede, restart recovery, a Redis outage, and ``route test``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
import redis
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from openmsk.config import Settings
from openmsk.jobs import JobState, JobStore, superseded_by
from openmsk.managed.process import spawn, stop
from openmsk.managed.redis import ManagedRedis
from scp.cli import register
from scp.dispatch import idempotency_key
from scp.routing import resolve_default_model
from scp.server import StorageSCP
from tests.mr_series import write_mr_series
from tests.processes import wait_for

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
StartSCP = Callable[..., StorageSCP]


def storescu(port: int, *paths: Path, calling: str = "SCANNER1") -> None:
    argv = ["storescu", "-aet", calling, "-aec", "OPENMSK", "127.0.0.1", str(port), *map(str, paths)]
    result = subprocess.run(argv, env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def start_scp(settings: Settings) -> Iterator[StartSCP]:
    started: list[StorageSCP] = []

    def start(base: Settings = settings, **overrides: object) -> StorageSCP:
        values = {"series_quiet_s": 0.3, "series_timeout_s": 5.0, "min_free_disk_mb": 0, **overrides}
        scp = StorageSCP(base.model_copy(update=values)).start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


@pytest.fixture
def jobs(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client)


def knee_series(folder: Path, count: int = 24, **attributes: object) -> list[Path]:
    return write_mr_series(folder, count, 16, 16, **attributes)


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def queued_message_job_ids(client: redis.Redis) -> list[str]:
    """Job ids in the Dramatiq messages waiting in Redis (the worker's actor does not exist here)."""
    ids = []
    for queue in ("default", "urgent"):
        for raw in client.hvals(f"openmsk:{queue}.msgs"):
            ids.extend(json.loads(raw)["args"])
    return ids


def wait_for_jobs(jobs: JobStore, count: int, what: str = "jobs") -> list:
    """Wait until ``count`` jobs are QUEUED and their Dramatiq messages are in Redis; return the jobs."""

    def ready() -> list | None:
        queued = jobs.list(JobState.QUEUED)
        if len(queued) == count and len(queued_message_job_ids(jobs.redis)) == count:
            return queued
        return None

    return wait_for(ready, what=what)  # type: ignore[return-value]


def test_released_series_becomes_one_queued_job_per_model(
    start_scp: StartSCP, jobs: JobStore, redis_client: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    scp = start_scp()
    files = knee_series(tmp_path / "knee")
    sent_at = time.monotonic()
    storescu(scp.port, *files)
    [job] = wait_for_jobs(jobs, 1)
    latency = time.monotonic() - sent_at
    study, series, _ = uids(files[0])
    sop_uids = sorted(uids(p)[2] for p in files)
    assert job.state is JobState.QUEUED
    assert (job.source, job.calling_ae, job.study_uid, job.series_uid) == ("scp", "SCANNER1", study, series)
    assert job.sop_uids == sop_uids
    assert job.model == resolve_default_model(settings)[0]
    assert job.destinations == ["orthanc"]
    assert job.input_path == f"incoming/{study}/{series}"
    assert job.idempotency_key == idempotency_key(series, sop_uids, job.model)
    assert queued_message_job_ids(redis_client) == [job.id]
    assert latency < 5.0  # quiet time 0.3 s after the release, not a 60 s stability wait
    assert list((settings.data_path / "spool").glob("*.json")) == []


def test_same_series_twice_makes_no_second_job_and_late_instances_supersede(
    start_scp: StartSCP, jobs: JobStore, redis_client: redis.Redis, tmp_path: Path
) -> None:
    scp = start_scp()
    files = knee_series(tmp_path / "knee")
    storescu(scp.port, *files)
    [first] = wait_for_jobs(jobs, 1)

    storescu(scp.port, *files)  # unchanged: a second round completes, with the same idempotency key
    wait_for(lambda: len(scp.completed) == 2, what="the second round")
    assert [j.id for j in jobs.list()] == [first.id]
    assert superseded_by(redis_client, first) is None

    _, series, _ = uids(files[0])
    late = write_mr_series(
        tmp_path / "late", 1, 16, 16, study_uid=uids(files[0])[0], series_uid=series, seed=9
    )
    storescu(scp.port, *late)
    [second] = [j for j in wait_for_jobs(jobs, 2, "the superseding job") if j.id != first.id]
    assert len(second.sop_uids) == len(first.sop_uids) + 1
    assert set(first.sop_uids) < set(second.sop_uids)
    assert superseded_by(redis_client, jobs.get(first.id)) == second.id
    assert superseded_by(redis_client, second) is None
    assert sorted(queued_message_job_ids(redis_client)) == sorted([first.id, second.id])


def test_localizers_and_other_series_are_ignored(start_scp: StartSCP, jobs: JobStore, tmp_path: Path) -> None:
    scp = start_scp()
    localizer = knee_series(tmp_path / "loc", 3, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    two_d = knee_series(tmp_path / "2d", 24, acquisition="2D")
    storescu(scp.port, *localizer, *two_d)
    wait_for(lambda: len(scp.completed) == 2, what="both series to complete")
    assert {r.rule for r in scp.completed} == {"localizers", "everything-else"}
    assert all(r.ignored for r in scp.completed)
    assert jobs.list() == []


def test_open_association_completes_after_the_timeout(
    start_scp: StartSCP, jobs: JobStore, tmp_path: Path
) -> None:
    scp = start_scp(series_quiet_s=0.2, series_timeout_s=1.5)
    files = knee_series(tmp_path / "knee")
    ae = AE(ae_title="KEEPOPEN")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="OPENMSK")
    try:
        for path in files:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
        last = time.monotonic()
        [job] = wait_for_jobs(jobs, 1, "the timeout job")
        waited = time.monotonic() - last
        assert assoc.is_established  # completed while the association was still open
        assert 1.4 <= waited < 4.0
        assert job.calling_ae == "KEEPOPEN" and len(job.sop_uids) == len(files)
    finally:
        assoc.release()


def test_series_left_pending_by_a_stopped_scp_are_queued_after_a_restart(
    start_scp: StartSCP, jobs: JobStore, settings: Settings, tmp_path: Path
) -> None:
    slow = start_scp(series_quiet_s=60.0, series_timeout_s=120.0)
    files = knee_series(tmp_path / "knee")
    storescu(slow.port, *files)
    slow.stop()
    assert jobs.list() == []

    restarted = start_scp()
    [job] = wait_for_jobs(jobs, 1, "the job after restart")
    assert job.calling_ae == "SCANNER1" and len(job.sop_uids) == len(files)
    restarted.stop()

    # Evaluated series are not evaluated again: start() re-reads what is on disk before it returns, and only
    # series it puts back in the tracker can become jobs.
    again = start_scp()
    assert again.tracker.pending() == [] and not again.completed and len(jobs.list()) == 1


def test_redis_outage_spools_series_and_queues_them_when_redis_returns(
    start_scp: StartSCP, settings: Settings, tmp_path: Path
) -> None:
    own_redis = ManagedRedis(tmp_path / "redis").start()
    try:
        scp = start_scp(settings.model_copy(update={"redis_url": own_redis.url}))
        own_redis.stop()
        first, second = knee_series(tmp_path / "a"), knee_series(tmp_path / "b")
        storescu(scp.port, *first)  # the SCP keeps accepting while Redis is down
        wait_for(lambda: len(scp.completed) == 1, what="the first series to complete")
        storescu(scp.port, *second)
        wait_for(lambda: len(scp.completed) == 2, what="the second series to complete")
        spool = settings.data_path / "spool"
        assert len(list(spool.glob("*.json"))) == 2
        assert not scp.dispatcher.redis_up

        own_redis = ManagedRedis(tmp_path / "redis", port=own_redis.port).start()
        store = JobStore(redis.Redis.from_url(own_redis.url))
        queued = wait_for_jobs(store, 2, "the spooled jobs")
        assert {j.series_uid for j in queued} == {uids(first[0])[1], uids(second[0])[1]}
        wait_for(lambda: not list(spool.glob("*.json")), what="the spool to empty")
    finally:
        own_redis.stop()


def test_route_test_explains_every_series(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    knee_series(tmp_path / "dicom" / "knee", 24, study_uid=generate_uid())
    knee_series(tmp_path / "dicom" / "loc", 3, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    (tmp_path / "dicom" / "notes.txt").write_text("not DICOM")
    monkeypatch.setenv("OPENMSK_DATA_DIR", str(tmp_path / "data"))
    parser = argparse.ArgumentParser(prog="openmsk")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["route", "test", str(tmp_path / "dicom"), "--calling-ae", "SCANNER1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    knee_block, loc_block = sorted(out.split("\n\n")[1:3], key=lambda b: "LOCALIZER" in b)
    assert "=> rule 'knee-3d-mr': models" in knee_block and "[match] knee-3d-mr" in knee_block
    assert "localizers: ImageType ['ORIGINAL', 'PRIMARY', 'M', 'ND'] lacks ['LOCALIZER']" in knee_block
    assert "[later] everything-else" in knee_block
    assert "=> rule 'localizers': ignore" in loc_block
    assert "knee-3d-mr" in loc_block and "fewer than 20" in loc_block


def test_python_m_scp_runs_from_the_environment_and_stops_cleanly_on_sigterm(
    settings: Settings, jobs: JobStore, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "OPENMSK_DATA_DIR": str(settings.data_path),
        "OPENMSK_REDIS_URL": settings.redis_url or "",
        "OPENMSK_SCP_HOST": "127.0.0.1",
        "OPENMSK_SCP_PORT": str(settings.scp_port),
        "OPENMSK_MIN_FREE_DISK_MB": "0",
        "OPENMSK_SERIES_QUIET_S": "0.3",
    }
    log = tmp_path / "scp.log"
    proc = spawn([sys.executable, "-m", "scp"], env=env, log=log, cwd=Path(__file__).resolve().parents[1])
    try:
        wait_for(lambda: "ready on" in log.read_text(), what="the SCP to start")
        storescu(settings.scp_port, *knee_series(tmp_path / "knee"))
        wait_for_jobs(jobs, 1)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert "SCP stopped" in log.read_text()
    finally:
        stop(proc)
