"""Orthanc as a source: a push with ``/modalities/<node>/store``, and the shipped auto-routing Lua script."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests

from openmsk.config import Settings
from openmsk.jobs import JobState, JobStore
from openmsk.managed.orthanc import ORTHANC_DIR, ManagedOrthanc
from openmsk.managed.process import free_port
from scp.server import StorageSCP
from tests.mr_series import write_mr_series
from tests.processes import wait_for


@pytest.fixture
def scp(settings: Settings) -> Iterator[StorageSCP]:
    values = {"series_quiet_s": 0.3, "series_timeout_s": 5.0, "min_free_disk_mb": 0}
    with StorageSCP(settings.model_copy(update=values)) as running:
        yield running


def upload(orthanc: ManagedOrthanc, paths: list[Path]) -> str:
    """Upload files to Orthanc over REST; returns the Orthanc id of their series."""
    series = set()
    for path in paths:
        answer = requests.post(
            f"{orthanc.url}/instances",
            data=path.read_bytes(),
            auth=(orthanc.user, orthanc.password),
            timeout=10,
        )
        answer.raise_for_status()
        series.add(answer.json()["ParentSeries"])
    [series_id] = series
    return series_id


def queued_jobs(redis_url: str, count: int) -> list:
    store = JobStore.from_url(redis_url)
    jobs = store.list(JobState.QUEUED)
    return jobs if len(jobs) == count else []


def test_orthanc_pushes_a_series_to_the_node(
    orthanc_server: ManagedOrthanc, scp: StorageSCP, settings: Settings, tmp_path: Path
) -> None:
    files = write_mr_series(tmp_path / "knee", 24, 16, 16)
    series_id = upload(orthanc_server, files)
    auth = (orthanc_server.user, orthanc_server.password)
    requests.put(
        f"{orthanc_server.url}/modalities/openmsk-test",
        json={"AET": settings.scp_ae_title, "Host": "127.0.0.1", "Port": scp.port},
        auth=auth,
        timeout=10,
    ).raise_for_status()
    answer = requests.post(
        f"{orthanc_server.url}/modalities/openmsk-test/store",
        json={"Resources": [series_id], "Synchronous": True},
        auth=auth,
        timeout=60,
    )
    answer.raise_for_status()
    [job] = wait_for(lambda: queued_jobs(settings.redis_url or "", 1), what="the job")  # type: ignore[misc]
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert job.series_uid == ds.SeriesInstanceUID and len(job.sop_uids) == 24
    assert job.calling_ae == orthanc_server.aet
    assert len(list((settings.data_path / job.input_path).glob("*.dcm"))) == 24


def test_orthanc_autoroutes_stable_mr_series_only(
    scp: StorageSCP, settings: Settings, tmp_path: Path
) -> None:
    mr = write_mr_series(tmp_path / "mr", 24, 16, 16)
    ct = write_mr_series(tmp_path / "ct", 3, 16, 16, modality="CT", sop_class="1.2.840.10008.5.1.4.1.1.2")
    ours = write_mr_series(tmp_path / "ours", 3, 16, 16, seed=77)  # as the node's derived T2 base series
    for path in ours:
        ds = pydicom.dcmread(path)
        ds.Manufacturer = "OpenMSK"
        ds.save_as(path)
    orthanc = ManagedOrthanc(
        data_dir=tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        user="test",
        password="test-password",
        modalities={"openmsk": (settings.scp_ae_title, "127.0.0.1", scp.port)},
        lua_scripts=[ORTHANC_DIR / "autoroute.lua"],
        extra={"StableAge": 1},
    )
    with orthanc:
        upload(orthanc, ct)
        upload(orthanc, ours)
        upload(orthanc, mr)
        [job] = wait_for(lambda: queued_jobs(settings.redis_url or "", 1), what="the auto-routed job")  # type: ignore[misc]
        assert job.series_uid == pydicom.dcmread(mr[0], stop_before_pixels=True).SeriesInstanceUID
        assert len(job.sop_uids) == 24 and job.calling_ae == orthanc.aet
        # The auto-routing decided about the CT series too (its log line) and did not send it.
        ct_series = pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID
        log = orthanc.data_dir / "orthanc.log"
        wait_for(lambda: "not forwarding stable CT series" in log.read_text(), what="the CT decision")
        assert not list((settings.data_path / "incoming").glob(f"*/{ct_series}"))
        wait_for(lambda: "was made by the node; not sent back" in log.read_text(), what="the node's own MR")
        own_series = pydicom.dcmread(ours[0], stop_before_pixels=True).SeriesInstanceUID
        assert not list((settings.data_path / "incoming").glob(f"*/{own_series}"))
