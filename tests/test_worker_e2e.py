"""The worker against real peers: Redis, Orthanc, worker processes — including one killed mid-job."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from openmsk.config import Settings
from openmsk.jobs import Job, JobState, JobStore
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.managed.process import free_port
from openmsk.models.registry import load_registry
from openmsk.orthanc_query import client_for, list_series
from openmsk.phantom import generate, write_series
from tests.conftest import ORTHANC_PASSWORD, ORTHANC_USER
from tests.processes import openmsk, settings_env, wait_for
from tests.quality import dice, threshold
from tests.worker_harness import stage_phantom, submit


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def orthanc_series(orthanc: ManagedOrthanc, study_uid: str, modality: str) -> list[dict]:
    query = {
        "Level": "Series",
        "Query": {"StudyInstanceUID": study_uid, "Modality": modality},
        "Expand": True,
    }
    response = requests.post(
        f"{orthanc.url}/tools/find", json=query, auth=(orthanc.user, orthanc.password), timeout=10
    )
    response.raise_for_status()
    return response.json()


def assert_results_once(orthanc: ManagedOrthanc, job: Job) -> None:
    """Every DICOM result the job recorded (tissue SEG, region SEG, SR, maps, T2) is in the source study
    exactly once, and the study holds no other result of the node: a rerun replaced, never duplicated."""
    assert job.results, "the job recorded no DICOM results"
    found: dict[str, int] = {}
    for modality in sorted({"SEG", "SR", "OT", "MR"}):
        for series in orthanc_series(orthanc, job.study_uid, modality):
            if modality == "MR" and series["MainDicomTags"].get("SeriesInstanceUID") == job.series_uid:
                continue  # the source images
            for instance in series["Instances"]:
                tags = requests.get(
                    f"{orthanc.url}/instances/{instance}/simplified-tags",
                    auth=(orthanc.user, orthanc.password),
                    timeout=10,
                ).json()
                uid = tags["SOPInstanceUID"]
                found[uid] = found.get(uid, 0) + 1
    expected = {result.sop_instance_uid for result in job.results}
    assert set(found) == expected, f"results in Orthanc {sorted(found)} != recorded {sorted(expected)}"
    assert all(count == 1 for count in found.values()), found


def worker_settings(settings: Settings, orthanc: ManagedOrthanc) -> Settings:
    return settings.model_copy(
        update={
            "orthanc_url": orthanc.url,
            "orthanc_user": orthanc.user,
            "orthanc_password": orthanc.password,
        }
    )


def worker_env(settings: Settings, orthanc: ManagedOrthanc) -> dict[str, str]:
    return settings_env(
        settings,
        OPENMSK_ORTHANC_URL=orthanc.url,
        OPENMSK_ORTHANC_USER=orthanc.user,
        OPENMSK_ORTHANC_PASSWORD=orthanc.password,
        OPENMSK_ORTHANC_DICOM_PORT=str(orthanc.dicom_port),
        OPENMSK_ORTHANC_AET=orthanc.aet,
        OPENMSK_DEVICE="cpu",
    )


def wait_job(store: JobStore, job_id: str, states: set[JobState], timeout_s: float) -> None:
    wait_for(lambda: store.get(job_id).state in states, timeout_s, f"job {job_id} in {sorted(states)}")


@pytest.fixture
def default_model(settings: Settings) -> str:
    return load_registry(settings.model_registry).default.name


def test_storescu_to_node_puts_seg_and_sr_into_the_study_in_orthanc(
    settings: Settings, orthanc_server: ManagedOrthanc, tmp_path: Path, default_model: str
) -> None:
    """scanner --storescu--> SCP --queue--> worker --REST--> Orthanc, with the default routing rule: the node is
    the first hop, so it archives the images in Orthanc too, and the SEG/SR land beside them in one study."""
    phantom = tmp_path / "phantom"
    write_series(generate(seed=4101, size="small", orientation="coronal", laterality="L"), phantom)
    files = sorted(str(p) for p in (phantom / "dicom").iterdir())
    dcmtk_env = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}
    env = worker_env(settings, orthanc_server)
    scp = openmsk("scp", env, tmp_path / "scp.log")
    worker = openmsk("worker", env, tmp_path / "worker.log")
    store = JobStore.from_url(str(settings.redis_url))
    try:
        wait_for(lambda: _port_open(settings.scp_port), 30, "SCP listening")
        subprocess.run(
            ["storescu", "-aet", "SCANNER1", "-aec", settings.scp_ae_title, "127.0.0.1", str(settings.scp_port),
             *files],
            check=True, env=dcmtk_env, timeout=60,
        )  # fmt: skip
        wait_for(lambda: store.count() == 1, 30, "the SCP queued one job")
        job = store.list()[0]
        assert job.source == "scp" and job.calling_ae == "SCANNER1" and job.instance_count == len(files)
        wait_job(store, job.id, {JobState.DONE, JobState.FAILED}, 180)
        job = store.get(job.id)
        assert job.state is JobState.DONE, job.error
        assert job.percent == 100 and job.deliveries["orthanc"].status == "done"
        assert {"load", "infer", "write", "analyse", "deliver"} <= set(job.stages)
        assert job.provenance.model_name == default_model and job.provenance.device == "cpu"
        names = {Path(f).name for f in job.files}
        expected = {
            "seg.dcm",
            "sr.dcm",
            "labels.nii.gz",
            "report.json",
            "report.csv",
            "preview.png",
            "manifest.json",
        }
        assert expected <= names

        assert job.archive == ["orthanc"]
        images = [
            series
            for series in orthanc_series(orthanc_server, job.study_uid, "MR")
            if series["MainDicomTags"].get("SeriesInstanceUID") == job.series_uid
        ]
        assert len(images) == 1 and len(images[0]["Instances"]) == len(files)
        assert_results_once(orthanc_server, job)
        segs = orthanc_series(orthanc_server, job.study_uid, "SEG")
        assert len(segs) == 2  # the tissues and the cartilage subregions
        assert len(orthanc_series(orthanc_server, job.study_uid, "SR")) == 1

        # `openmsk orthanc series` shows the result next to its source series, with the model version.
        rows = {
            row.series_uid: row for row in list_series(client_for(worker_settings(settings, orthanc_server)))
        }
        entry = load_registry(settings.model_registry).get(default_model)
        assert rows[job.series_uid].results == [f"{entry.name} {entry.version}"]
        assert rows[job.series_uid].modality == "MR"

        truth = nib.load(phantom / "labels.nii.gz").get_fdata().astype(np.uint8)
        found = (
            nib.load(settings.data_path / f"jobs/{job.id}/output/labels.nii.gz").get_fdata().astype(np.uint8)
        )
        # Through the whole node the default model meets its own targets (a flipped axis, a wrong
        # reorientation or a shuffled label map would give Dice near 0).
        for label in range(1, 10):
            score = dice(truth == label, found == label)
            print(f"label {label}: Dice {score:.3f}")
            assert score >= threshold(label), f"label {label}: Dice {score:.3f} < {threshold(label)}"
    finally:
        for proc in (scp, worker):
            proc.kill()
            proc.wait(timeout=10)


def test_killed_worker_job_finishes_on_second_worker_once(
    settings: Settings, orthanc_server: ManagedOrthanc, tmp_path: Path, default_model: str
) -> None:
    _, series = stage_phantom(settings.data_path, seed=4102)
    env = worker_env(settings, orthanc_server)
    workers = [openmsk("worker", env, tmp_path / f"worker{n}.log") for n in (1, 2)]
    store = JobStore.from_url(str(settings.redis_url))
    try:
        job = submit(str(settings.redis_url), settings.data_path, series, default_model, ["orthanc"])
        wait_job(store, job.id, {JobState.RUNNING, JobState.DONE, JobState.FAILED}, 60)
        assert store.get(job.id).state is JobState.RUNNING, store.get(job.id).error
        holder = store.get(job.id).worker
        victim = next(w for w in workers if holder is not None and holder.endswith(f":{w.pid}"))
        survivor = next(w for w in workers if w is not victim)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        killed_at, killed_wall = time.monotonic(), time.time()
        wait_job(store, job.id, {JobState.DONE, JobState.FAILED}, 90)
        finished = time.monotonic() - killed_at
        job = store.get(job.id)
        assert job.state is JobState.DONE, job.error
        assert job.worker is not None and job.worker.endswith(f":{survivor.pid}")
        assert job.attempts == 2
        redelivered = job.state_times["running"] - killed_wall
        print(f"rerun started {redelivered:.1f} s and finished {finished:.1f} s after the kill")
        assert redelivered < 15  # heartbeat timeout + a maintenance pass
        assert finished < 30
        assert_results_once(orthanc_server, job)  # the rerun replaced, never duplicated
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_job_waits_in_delivering_while_orthanc_is_down(
    settings: Settings, tmp_path: Path, default_model: str
) -> None:
    orthanc = ManagedOrthanc(
        data_dir=tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port(),
        user=ORTHANC_USER, password=ORTHANC_PASSWORD,
    )  # fmt: skip
    _, series = stage_phantom(settings.data_path, seed=4103, orientation="axial")
    orthanc.start()
    orthanc.stop()  # configured but down
    worker = openmsk("worker", worker_env(settings, orthanc), tmp_path / "worker.log")
    store = JobStore.from_url(str(settings.redis_url))
    try:
        job = submit(str(settings.redis_url), settings.data_path, series, default_model, ["orthanc"])
        wait_for(
            lambda: (
                store.get(job.id).deliveries.get("orthanc") is not None
                and store.get(job.id).deliveries["orthanc"].attempts >= 2
            ),
            120,
            "two failed delivery attempts",
        )
        job = store.get(job.id)
        assert job.state is JobState.DELIVERING
        assert job.deliveries["orthanc"].status == "retrying" and job.deliveries["orthanc"].last_error
        orthanc.start()
        wait_job(store, job.id, {JobState.DONE, JobState.FAILED}, 60)
        job = store.get(job.id)
        assert job.state is JobState.DONE, job.error
        assert_results_once(orthanc, job)
    finally:
        worker.kill()
        worker.wait(timeout=10)
        orthanc.stop()
