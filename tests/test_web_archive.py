"""Archive forwarding of uploads, as the web sees it, against real `openmsk web` processes, the test Redis and
the test Orthanc: an uploaded DICOM series becomes a job with ``archive == ["orthanc"]`` and a forward order in
``DATA_DIR/forward/`` naming exactly its stored files; the job page, ``GET /api/jobs/<id>`` and ``/metrics``
show the forwarder's state (written here with ``ForwardStates.set``, as the forwarder would)."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import redis
import requests

from openmsk.config import load_settings
from openmsk.forwarding import ForwardOutbox, ForwardState, ForwardStates, instances_digest
from openmsk.jobs import Delivery, Job, JobState, JobStore
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.managed.process import free_port
from openmsk.managed.redis import ManagedRedis
from openmsk.phantom import generate, write_series
from tests.conftest import ORTHANC_PASSWORD, ORTHANC_USER
from tests.test_web_api import (
    MAX_UPLOAD_MB,
    PASSWORD,
    TOKEN,
    USER,
    Web,
    _sign_in,
    series_zip,
    start_web,
    stop_web,
    upload,
    write_test_registry,
)
from web.auth import hash_password

# One metric line of the Prometheus text format: name, optional labels, a number.
METRIC_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]+="[^"]*",?)*\})? -?[0-9.e+]+$')


def _start(root: Path, redis_server: ManagedRedis, registry: Path, **orthanc: str) -> tuple[Web, object]:
    settings = load_settings(
        data_dir=root / "data",
        redis_url=redis_server.url,
        web_host="127.0.0.1",
        web_port=free_port(),
        api_tokens=[TOKEN],
        model_registry=registry,
        max_upload_mb=MAX_UPLOAD_MB,
        max_unzipped_mb=16,
        upload_rate_limit=100,
        web_users=f"{USER}:{hash_password(PASSWORD)}",
        min_free_disk_mb=0,
        **orthanc,
    )
    proc = start_web(settings, root / "web.log")
    return Web(f"http://127.0.0.1:{settings.web_port}", settings, root / "web.log"), proc


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_registry(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def web(
    redis_server: ManagedRedis,
    orthanc_server: ManagedOrthanc,
    registry: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Web]:
    """`openmsk web` with Orthanc configured: uploaded DICOM is forwarded there."""
    node, proc = _start(
        tmp_path_factory.mktemp("web"),
        redis_server,
        registry,
        orthanc_url=orthanc_server.url,
        orthanc_user=ORTHANC_USER,
        orthanc_password=ORTHANC_PASSWORD,
    )
    yield node
    stop_web(proc)


@pytest.fixture
def store(web: Web, redis_url: str) -> JobStore:
    """A clean Redis database and empty uploads, jobs and outbox for each test."""
    for folder in ("uploads", "jobs", "forward"):
        shutil.rmtree(web.data / folder, ignore_errors=True)
    return JobStore.from_url(redis_url)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("phantom")
    write_series(generate(seed=31, size="small"), folder)
    return folder


@pytest.fixture(scope="module")
def second_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("phantom2")
    write_series(generate(seed=32, size="small", orientation="coronal"), folder)
    return folder


def _uploaded(web: Web, store: JobStore, phantom: Path) -> Job:
    response = upload(web, [("knee.zip", series_zip(phantom))])
    assert response.status_code == 202, response.text
    return store.get(response.json()["id"])


# ------------------------------------------------------------------------------------------- the order


def test_an_uploaded_series_is_ordered_to_orthanc_before_it_is_queued(
    web: Web, store: JobStore, phantom: Path
) -> None:
    job = _uploaded(web, store, phantom)
    assert job.archive == ["orthanc"] and job.destinations == ["orthanc"]
    assert job.state is JobState.QUEUED

    orders = ForwardOutbox(web.data).orders()
    assert len(orders) == 1
    order = orders[0]
    assert order.source == "upload" and order.destinations == ["orthanc"]
    assert (order.study_uid, order.series_uid) == (job.study_uid, job.series_uid)
    assert order.folder == job.input_path == f"uploads/{job.id}/dicom"
    assert order.created_at <= job.state_times[JobState.QUEUED.value]  # durable before it was queued

    # Every instance of the job, each naming its own stored file, byte for byte what was uploaded.
    assert sorted(order.files) == sorted(job.sop_uids) and len(order.files) == 40
    originals = {pydicom.dcmread(p).SOPInstanceUID: p.read_bytes() for p in (phantom / "dicom").iterdir()}
    for sop_uid, name in order.files.items():
        stored = web.data / order.folder / name
        assert stored.is_file() and stored.parent == web.data / order.folder
        assert pydicom.dcmread(stored, stop_before_pixels=True).SOPInstanceUID == sop_uid
        assert stored.read_bytes() == originals[sop_uid]


def test_a_volume_or_a_refused_upload_orders_nothing(
    web: Web, store: JobStore, phantom: Path, second_phantom: Path
) -> None:
    response = upload(web, [("labels.nii.gz", (phantom / "labels.nii.gz").read_bytes())])
    assert response.status_code == 202, response.text
    job = store.get(response.json()["id"])
    assert job.archive == [] and job.destinations == []

    refused = upload(web, [("two.zip", series_zip(phantom, second_phantom))])
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "SEVERAL_SERIES"
    assert len(ForwardOutbox(web.data)) == 0


def test_without_orthanc_an_upload_orders_nothing(
    redis_server: ManagedRedis, redis_url: str, registry: Path, phantom: Path, tmp_path: Path
) -> None:
    node, proc = _start(tmp_path, redis_server, registry)
    try:
        response = upload(node, [("knee.zip", series_zip(phantom))])
        assert response.status_code == 202, response.text
        job = JobStore.from_url(redis_url).get(response.json()["id"])
        assert job.archive == [] and job.destinations == []
        assert len(ForwardOutbox(node.data)) == 0
    finally:
        stop_web(proc)


# ------------------------------------------------------------------------------------------- the state


def test_the_job_page_and_the_api_show_the_forwarding_state(
    web: Web, store: JobStore, redis_client: redis.Redis, phantom: Path
) -> None:
    job = _uploaded(web, store, phantom)
    states = ForwardStates(redis_client)
    digest = instances_digest(job.sop_uids)
    browser = _sign_in(web, USER, PASSWORD)

    def shown() -> tuple[dict, str]:
        status = web.api().get(f"{web.url}/api/jobs/{job.id}", timeout=10).json()
        page = browser.get(f"{web.url}/jobs/{job.id}", timeout=10).text
        return status, page

    status, page = shown()  # nothing from the forwarder yet
    assert status["archive"]["orthanc"]["status"] == "pending"
    assert status["archive"]["orthanc"]["total"] == 40 and status["archive"]["orthanc"]["sent"] == 0
    assert "Images to orthanc: waiting to be sent (40 images)" in page

    states.set(job.series_uid, "orthanc", ForwardState(digest=digest, total=40, sent=12, attempts=1))
    status, page = shown()
    archive = status["archive"]["orthanc"]
    assert (archive["status"], archive["sent"], archive["total"], archive["digest"]) == (
        "pending",
        12,
        40,
        digest,
    )
    assert "Images to orthanc: 12/40 sent" in page

    later = time.time() + 20
    retrying = ForwardState(
        status="retrying",
        digest=digest,
        total=40,
        sent=30,
        attempts=3,
        last_error="connection refused",
        next_attempt_at=later,
    )
    states.set(job.series_uid, "orthanc", retrying)
    status, page = shown()
    archive = status["archive"]["orthanc"]
    assert archive["status"] == "retrying" and archive["attempts"] == 3
    assert archive["last_error"] == "connection refused" and archive["next_attempt_at"] == pytest.approx(
        later
    )
    assert re.search(
        r"Images to orthanc: retrying \(attempt 3, next in (19|20) s, 30/40 sent\): connection refused", page
    )

    # Results waiting for the images at their destination.
    store.update(job.id, lambda j: j.deliveries.__setitem__("orthanc", Delivery(status="waiting")))
    status, page = shown()
    assert status["deliveries"]["orthanc"]["status"] == "waiting"
    assert "Results to orthanc: waiting for the images to reach orthanc" in page

    for state, text in (("done", "archived"), ("skipped", "already there")):
        states.set(job.series_uid, "orthanc", ForwardState(status=state, digest=digest, total=40, sent=40))
        status, page = shown()
        assert status["archive"]["orthanc"]["status"] == state
        assert f"Images to orthanc: {text}" in page

    # A state about another set of instances of the series is not this job's.
    states.set(job.series_uid, "orthanc", ForwardState(status="done", digest="0" * 64, total=3, sent=3))
    status, page = shown()
    assert status["archive"]["orthanc"]["status"] == "pending"
    assert "Images to orthanc: archived" not in page


def test_metrics_show_the_forwarding_figures(
    web: Web, store: JobStore, redis_client: redis.Redis, phantom: Path
) -> None:
    text = requests.get(f"{web.url}/metrics", timeout=10).text
    assert "openmsk_archive_outbox_orders 0" in text and "openmsk_archive_series{" not in text

    _uploaded(web, store, phantom)  # one order in the outbox
    states = ForwardStates(redis_client)
    states.set("1.2.3.1", "orthanc", ForwardState(status="retrying", attempts=2))
    states.set("1.2.3.2", "orthanc", ForwardState(status="retrying", attempts=5))
    states.set("1.2.3.3", "orthanc", ForwardState(status="failed", attempts=8))
    states.set("1.2.3.4", "orthanc", ForwardState(status="done"))
    states.set("1.2.3.4", "pacs", ForwardState(status="pending"))
    states.count("instances_sent", 120)
    states.count("orders_done", 2)
    states.count("send_failures", 3)

    text = requests.get(f"{web.url}/metrics", timeout=10).text
    assert 'openmsk_archive_series{destination="orthanc",status="retrying"} 2' in text
    assert 'openmsk_archive_series{destination="orthanc",status="failed"} 1' in text
    assert 'openmsk_archive_series{destination="pacs",status="pending"} 1' in text
    assert 'status="done"' not in text  # finished series are not waiting
    assert "openmsk_archive_instances_sent_total 120" in text
    assert "openmsk_archive_orders_done_total 2" in text
    assert "openmsk_archive_send_failures_total 3" in text
    assert "openmsk_archive_outbox_orders 1" in text
    assert "# TYPE openmsk_archive_instances_sent_total counter" in text
    assert "# TYPE openmsk_archive_series gauge" in text
    bad = [line for line in text.splitlines() if not line.startswith("#") and not METRIC_LINE.match(line)]
    assert bad == []
