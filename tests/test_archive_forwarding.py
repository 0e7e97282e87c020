"""Archive forwarding: a scanner that sends to the node first gets its images into Orthanc, results after them.

Real peers throughout: dcmtk's storescu as the scanner, the node's SCP (in-process) with its forwarder, a real
Orthanc (the session's, or one of the test's own that it stops and starts), Redis, and a worker process.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from forwarder import forwarder as forwarder_module
from openmsk.config import Settings
from openmsk.forwarding import ForwardOutbox, ForwardStates
from openmsk.jobs import JobState, JobStore
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.managed.process import free_port
from openmsk.phantom import generate, write_series
from scp.server import StorageSCP
from tests.conftest import ORTHANC_PASSWORD, ORTHANC_USER
from tests.processes import openmsk, settings_env, wait_for

DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}


def phantom_files(tmp_path: Path, seed: int) -> list[Path]:
    folder = tmp_path / f"phantom-{seed}"
    write_series(generate(seed=seed, size="small", orientation="sagittal", laterality="R"), folder)
    return sorted((folder / "dicom").iterdir())


def storescu(files: list[Path], port: int, called: str, calling: str = "SCANNER1") -> None:
    subprocess.run(
        ["storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        check=True, env=DCMTK_ENV, timeout=120,
    )  # fmt: skip


def with_orthanc(settings: Settings, orthanc: ManagedOrthanc, **extra: object) -> Settings:
    values = {
        "orthanc_url": orthanc.url,
        "orthanc_user": orthanc.user,
        "orthanc_password": orthanc.password,
        "orthanc_dicom_port": orthanc.dicom_port,
        "orthanc_aet": orthanc.aet,
        "series_quiet_s": 0.3,
        "series_timeout_s": 5.0,
        "min_free_disk_mb": 0,
        **extra,
    }
    return settings.model_copy(update=values)


def orthanc_instances(orthanc: ManagedOrthanc, series_uid: str) -> list[dict]:
    query = {"Level": "Instance", "Query": {"SeriesInstanceUID": series_uid}, "Expand": True}
    answer = requests.post(
        f"{orthanc.url}/tools/find", json=query, auth=(orthanc.user, orthanc.password), timeout=10
    )
    answer.raise_for_status()
    return answer.json()


def remote_aet(orthanc: ManagedOrthanc, instance_id: str) -> str:
    answer = requests.get(
        f"{orthanc.url}/instances/{instance_id}/metadata/RemoteAET",
        auth=(orthanc.user, orthanc.password),
        timeout=10,
    )
    answer.raise_for_status()
    return answer.text


@pytest.fixture
def own_orthanc(tmp_path: Path) -> Iterator[ManagedOrthanc]:
    """An Orthanc of this test's own, which it may stop and start."""
    orthanc = ManagedOrthanc(
        data_dir=tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port(),
        user=ORTHANC_USER, password=ORTHANC_PASSWORD,
    )  # fmt: skip
    yield orthanc
    orthanc.stop()


def test_series_from_a_scanner_is_archived_as_received(
    settings: Settings, orthanc_server: ManagedOrthanc, tmp_path: Path, redis_client: object
) -> None:
    files = phantom_files(tmp_path, 4201)
    configured = with_orthanc(settings, orthanc_server)
    with StorageSCP(configured) as scp:
        storescu(files, scp.port, configured.scp_ae_title)
        wait_for(lambda: scp.completed, 30, "series complete")
        result = scp.completed[0]
        assert result.archive == ["orthanc"]
        assert [job.archive for job in result.jobs] == [["orthanc"]]
        series_uid = result.series.series_uid
        states = ForwardStates(redis_client)  # type: ignore[arg-type]
        wait_for(lambda: states.get(series_uid).get("orthanc", None) is not None
                 and states.get(series_uid)["orthanc"].status == "done", 60, "images archived")  # fmt: skip
        state = states.get(series_uid)["orthanc"]
        assert (state.total, state.sent) == (len(files), len(files))
        wait_for(lambda: len(ForwardOutbox(configured.data_path)) == 0, 10, "order leaves the outbox")
    found = orthanc_instances(orthanc_server, series_uid)
    assert len(found) == len(files)
    # Orthanc got them from the node over DICOM (so its auto-routing knows not to send them back) ...
    assert remote_aet(orthanc_server, found[0]["ID"]) == configured.scp_ae_title
    # ... byte for byte as the scanner sent them (no transcoding).
    by_uid = {f["MainDicomTags"]["SOPInstanceUID"]: f["ID"] for f in found}
    sample = files[len(files) // 2]
    sop_uid = str(pydicom.dcmread(sample, stop_before_pixels=True).SOPInstanceUID)
    stored = requests.get(
        f"{orthanc_server.url}/instances/{by_uid[sop_uid]}/file",
        auth=(orthanc_server.user, orthanc_server.password),
        timeout=10,
    ).content
    original = pydicom.dcmread(sample)
    archived = pydicom.dcmread(io.BytesIO(stored))
    assert archived.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert archived.PixelData == original.PixelData


def test_series_from_orthanc_or_already_there_is_not_sent_back(
    settings: Settings, orthanc_server: ManagedOrthanc, tmp_path: Path, redis_client: object
) -> None:
    from_orthanc = phantom_files(tmp_path, 4202)
    already_there = phantom_files(tmp_path, 4203)
    storescu(from_orthanc + already_there, orthanc_server.dicom_port, orthanc_server.aet, calling="MODALITY")
    configured = with_orthanc(settings, orthanc_server)
    states = ForwardStates(redis_client)  # type: ignore[arg-type]
    with StorageSCP(configured) as scp:
        # Orthanc's own AE title sends the first series (as its auto-routing does): no archive order at all.
        storescu(from_orthanc, scp.port, configured.scp_ae_title, calling=orthanc_server.aet)
        wait_for(lambda: scp.completed, 30, "first series complete")
        first = scp.completed[0]
        assert first.archive == [] and [job.archive for job in first.jobs] == [[]]
        assert states.get(first.series.series_uid) == {}
        # A scanner that sent to Orthanc and to the node: the forwarder asks Orthanc and sends nothing.
        storescu(already_there, scp.port, configured.scp_ae_title, calling="SCANNER2")
        wait_for(lambda: len(scp.completed) == 2, 30, "second series complete")
        second = scp.completed[1]
        assert second.archive == ["orthanc"]
        uid = second.series.series_uid
        wait_for(lambda: "orthanc" in states.get(uid) and states.get(uid)["orthanc"].arrived, 30, "checked")
        state = states.get(uid)["orthanc"]
        assert (state.status, state.sent) == ("skipped", 0)
        assert states.counters().get("instances_sent", 0) == 0
    for series_files, series_uid in ((from_orthanc, first.series.series_uid), (already_there, uid)):
        found = orthanc_instances(orthanc_server, series_uid)
        assert len(found) == len(series_files)
        assert remote_aet(orthanc_server, found[0]["ID"]) == "MODALITY"  # never re-sent by the node


def test_forwarding_survives_an_archive_that_is_down_and_a_restart(
    settings: Settings, own_orthanc: ManagedOrthanc, tmp_path: Path, redis_client: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(forwarder_module, "BACKOFF_S", (0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2))
    files = phantom_files(tmp_path, 4204)
    own_orthanc.start()
    own_orthanc.stop()  # configured, but down
    configured = with_orthanc(settings, own_orthanc)
    states = ForwardStates(redis_client)  # type: ignore[arg-type]
    outbox = ForwardOutbox(configured.data_path)
    with StorageSCP(configured) as scp:
        storescu(files, scp.port, configured.scp_ae_title)
        wait_for(lambda: scp.completed, 30, "series complete")
        result = scp.completed[0]
        uid = result.series.series_uid
        wait_for(
            lambda: "orthanc" in states.get(uid) and states.get(uid)["orthanc"].attempts >= 2, 30, "retries"
        )
        state = states.get(uid)["orthanc"]
        assert state.status == "retrying" and state.last_error and state.next_attempt_at
    # The SCP stopped with the archive still down: the order waits on disk ...
    [order] = outbox.orders()
    assert order.series_uid == uid and len(order.files) == len(files)
    assert json.loads((outbox.root / f"{order.id}.json").read_text())["destinations"] == ["orthanc"]
    # ... and a new SCP process sends it once the archive is back.
    own_orthanc.start()
    with StorageSCP(configured):
        wait_for(lambda: states.get(uid)["orthanc"].status == "done", 60, "archived after the restart")
        wait_for(lambda: len(outbox) == 0, 10, "order leaves the outbox")
    assert len(orthanc_instances(own_orthanc, uid)) == len(files)


def test_results_wait_for_their_images_in_the_archive(
    settings: Settings, own_orthanc: ManagedOrthanc, tmp_path: Path, redis_client: object
) -> None:
    """storescu → SCP → worker: the SEG/SR delivery waits while the images cannot reach Orthanc."""
    files = phantom_files(tmp_path, 4205)
    own_orthanc.start()
    configured = with_orthanc(settings, own_orthanc)
    env = settings_env(configured, OPENMSK_DEVICE="cpu")
    store = JobStore.from_url(str(settings.redis_url))
    worker = openmsk("worker", env, tmp_path / "worker.log")
    states = ForwardStates(redis_client)  # type: ignore[arg-type]
    blocked = configured.model_copy(update={"orthanc_dicom_port": free_port()})  # the SCP's C-STORE fails
    try:
        with StorageSCP(blocked) as scp:
            storescu(files, scp.port, configured.scp_ae_title)
            wait_for(lambda: scp.completed, 30, "series complete")
            result = scp.completed[0]
            [job] = result.jobs
            wait_for(lambda: store.get(job.id).state is JobState.DELIVERING, 180, "segmented")
            wait_for(lambda: store.get(job.id).deliveries["orthanc"].status == "waiting", 30, "waiting")
            assert states.get(job.series_uid)["orthanc"].status in ("pending", "retrying")
            seg_uid = next(r.sop_instance_uid for r in store.get(job.id).results if "66.4" in r.sop_class_uid)
            assert not _find_sop(own_orthanc, seg_uid)  # no result before its images
        with StorageSCP(configured):  # the archive is reachable now: images first, then the results
            wait_for(lambda: store.get(job.id).state in (JobState.DONE, JobState.FAILED), 90, "job finished")
        job = store.get(job.id)
        assert job.state is JobState.DONE, job.error
        images_done = states.get(job.series_uid)["orthanc"]
        assert images_done.status == "done"
        assert images_done.updated_at <= job.deliveries["orthanc"].updated_at
        assert len(orthanc_instances(own_orthanc, job.series_uid)) == len(files)
        assert _find_sop(own_orthanc, seg_uid)
    finally:
        worker.kill()
        worker.wait(timeout=10)


def _find_sop(orthanc: ManagedOrthanc, sop_uid: str) -> bool:
    query = {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}
    answer = requests.post(
        f"{orthanc.url}/tools/find", json=query, auth=(orthanc.user, orthanc.password), timeout=10
    )
    answer.raise_for_status()
    return bool(answer.json())


def test_orthanc_does_not_route_back_what_the_node_archived(
    settings: Settings, tmp_path: Path, redis_client: object
) -> None:
    """Orthanc with the shipped auto-routing: the series the node archived there is not sent back to it."""
    from openmsk.config import REPO_DIR

    files = phantom_files(tmp_path, 4206)
    scp_port = free_port()
    orthanc = ManagedOrthanc(
        data_dir=tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port(),
        user=ORTHANC_USER, password=ORTHANC_PASSWORD,
        modalities={"openmsk": (settings.scp_ae_title, "127.0.0.1", scp_port)},
        lua_scripts=[REPO_DIR / "orthanc" / "autoroute.lua"], extra={"StableAge": 1},
    )  # fmt: skip
    configured = with_orthanc(settings, orthanc, scp_port=scp_port)
    states = ForwardStates(redis_client)  # type: ignore[arg-type]
    with orthanc, StorageSCP(configured) as scp:
        storescu(files, scp.port, configured.scp_ae_title)
        wait_for(lambda: scp.completed, 30, "series complete")
        uid = scp.completed[0].series.series_uid
        wait_for(
            lambda: "orthanc" in states.get(uid) and states.get(uid)["orthanc"].status == "done", 30, "sent"
        )
        log = orthanc.data_dir / "orthanc.log"
        wait_for(lambda: "; not sent back" in log.read_text(), 30, "Orthanc's auto-routing decision")
        assert "forwarding stable MR series" not in log.read_text()
        assert len(scp.completed) == 1 and scp.tracker.pending() == []
