"""The web API against a real `openmsk web` process (waitress) and the test Redis: uploads, every refusal,
job status and lists, downloads, metrics, sign-in, CSRF, rate limits, security headers, retention."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import redis
import requests
from werkzeug.security import check_password_hash

from openmsk.config import Settings, load_settings
from openmsk.jobs import Delivery, Job, JobState, JobStore, StageTiming
from openmsk.managed.process import free_port
from openmsk.managed.redis import ManagedRedis
from openmsk.models.registry import ModelEntry, hash_files, write_registry
from openmsk.phantom import generate, write_series
from openmsk.stored_secrets import ensure_api_token
from tests.processes import openmsk, settings_env, wait_for
from web.auth import hash_password
from web.retention import cleanup

TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "test-token-for-the-rate-limit"
USER, PASSWORD = "alice", "correct horse battery"
MB = 1024 * 1024
MAX_UPLOAD_MB = 8


# ----------------------------------------------------------------------------------------------- fixtures


def write_test_registry(folder: Path) -> Path:
    """A real registry with one usable model (default) and one whose weights are missing."""
    for name in ("demo", "broken"):
        (folder / name).mkdir(parents=True)
    weights = folder / "demo" / "weights.pt"
    weights.write_bytes(b"not really weights")
    labels = {1: "femur", 2: "tibia"}
    demo = ModelEntry(
        name="demo",
        kind="slicewise2d",
        folder=folder / "demo",
        labels=labels,
        checkpoint="weights.pt",
        sha256=hash_files(folder / "demo", [weights]),
        version="1.0",
        default=True,
    )
    broken = ModelEntry(
        name="broken",
        kind="slicewise2d",
        folder=folder / "broken",
        labels=labels,
        checkpoint="weights.pt",
        sha256={"weights.pt": "0" * 64},
        version="0.1",
    )
    path = folder / "registry.toml"
    write_registry(path, [demo, broken])
    return path


@dataclass
class Web:
    url: str
    settings: Settings
    log: Path

    @property
    def data(self) -> Path:
        return self.settings.data_path

    def api(self, token: str = TOKEN) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        return session


def start_web(settings: Settings, log: Path) -> subprocess.Popen:
    """``openmsk web`` for ``settings``, once it answers (the sign-in page needs neither Redis nor models)."""
    proc = openmsk("web", settings_env(settings), log)
    url = f"http://127.0.0.1:{settings.web_port}"
    try:
        wait_for(lambda: requests.get(f"{url}/login", timeout=5).status_code == 200, 30, "web answering")
    except AssertionError:
        proc.kill()
        raise AssertionError(log.read_text()) from None
    return proc


def stop_web(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_registry(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def web(
    redis_server: ManagedRedis, registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Web]:
    root = tmp_path_factory.mktemp("web")
    settings = load_settings(
        data_dir=root / "data",
        redis_url=redis_server.url,
        web_host="127.0.0.1",
        web_port=free_port(),
        api_tokens=[TOKEN, OTHER_TOKEN],
        model_registry=registry,
        max_upload_mb=MAX_UPLOAD_MB,
        max_unzipped_mb=16,
        upload_rate_limit=30,
        web_users=f"{USER}:{hash_password(PASSWORD)}",
        min_free_disk_mb=0,
    )
    proc = start_web(settings, root / "web.log")
    yield Web(f"http://127.0.0.1:{settings.web_port}", settings, root / "web.log")
    stop_web(proc)


@pytest.fixture
def store(web: Web, redis_url: str) -> JobStore:
    """A clean Redis database and an empty DATA_DIR for each test (the web process keeps running)."""
    for folder in ("uploads", "jobs"):
        shutil.rmtree(web.data / folder, ignore_errors=True)
    return JobStore.from_url(redis_url)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom series: ``dicom/*.dcm`` plus its labels as a NIfTI volume."""
    folder = tmp_path_factory.mktemp("phantom")
    write_series(generate(seed=11, size="small"), folder)
    return folder


@pytest.fixture(scope="module")
def second_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("phantom2")
    write_series(generate(seed=12, size="small", orientation="coronal"), folder)
    return folder


# ----------------------------------------------------------------------------------------------- helpers


def zip_bytes(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def series_zip(*folders: Path, prefix: str = "study/series") -> bytes:
    """The DICOM files of ``folders`` in one zip, with extension-less names inside a sub-folder."""
    entries = {}
    for number, folder in enumerate(folders):
        for path in sorted((folder / "dicom").iterdir()):
            entries[f"{prefix}{number}/{path.stem}"] = path.read_bytes()
    return zip_bytes(entries)


def upload(web: Web, files: list[tuple[str, bytes]], token: str = TOKEN, **fields: str) -> requests.Response:
    parts = [("file", (name, data, "application/octet-stream")) for name, data in files]
    return web.api(token).post(f"{web.url}/api/jobs", files=parts, data=fields, timeout=60)


def error_of(response: requests.Response) -> dict:
    body = response.json()
    assert "Traceback" not in response.text
    return body["error"]


def assert_nothing_left(web: Web, store: JobStore) -> None:
    uploads = web.data / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []
    assert store.count() == 0


def series_uid(folder: Path) -> str:
    first = next((folder / "dicom").iterdir())
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def nrrd_bytes(dimension: int = 3, detached: bool = False) -> bytes:
    sizes = " ".join(["4"] * dimension)
    header = f"NRRD0004\ntype: uint8\ndimension: {dimension}\nsizes: {sizes}\nencoding: raw\n"
    if detached:
        return (header + "data file: volume.raw\n\n").encode()
    return (header + "\n").encode() + bytes(4**dimension)


def raw_request(web: Web, head: bytes, body_chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Send a request over a plain socket, stop sending when the server answers or closes; return the answer
    and how many body bytes went out."""
    sent = 0
    with socket.create_connection(("127.0.0.1", web.settings.web_port), timeout=30) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        answer = b""
        try:
            for chunk in body_chunks:
                with contextlib.suppress(BlockingIOError):
                    answer += sock.recv(65536)
                if answer:
                    break
                view = memoryview(chunk)
                while view:
                    try:
                        view = view[sock.send(view) :]
                    except BlockingIOError:
                        time.sleep(0.001)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.setblocking(True)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, sent


# ----------------------------------------------------------------------------------------------- access


def test_health_and_metrics_are_open_the_api_needs_a_token(web: Web, store: JobStore) -> None:
    assert (
        requests.get(f"{web.url}/health", timeout=10).headers["Content-Type"].startswith("application/json")
    )
    assert requests.get(f"{web.url}/metrics", timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = requests.get(f"{web.url}/api/jobs", headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert error_of(response)["code"] == "UNAUTHORIZED"
    assert web.api().get(f"{web.url}/api/jobs", timeout=10).status_code == 200


def test_models_are_listed_with_the_default_marked(web: Web, store: JobStore) -> None:
    models = {m["name"]: m for m in web.api().get(f"{web.url}/api/models", timeout=10).json()["models"]}
    assert models["demo"]["default"] and models["demo"]["status"] == "ok"
    assert not models["broken"]["default"] and models["broken"]["status"] != "ok"


# ------------------------------------------------------------------------------------------- accepted uploads


def test_zip_of_a_series_becomes_a_queued_job(web: Web, store: JobStore, phantom: Path) -> None:
    response = upload(web, [("knee.zip", series_zip(phantom))])
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status_url"] == f"/api/jobs/{body['id']}" == response.headers["Location"]

    job = store.get(body["id"])
    assert job.source == "upload" and job.state is JobState.QUEUED and job.model == "demo"
    assert job.input_path == f"uploads/{job.id}/dicom" and job.destinations == []
    assert job.series_uid == series_uid(phantom) and job.instance_count == 40
    stored = sorted((web.data / job.input_path).iterdir())
    assert [p.name for p in stored] == [f"{n:06d}.dcm" for n in range(1, 41)]
    assert sorted(os.listdir(web.data / "uploads" / job.id)) == ["dicom"]  # no scratch, no client names
    originals = {pydicom.dcmread(p).SOPInstanceUID: p.read_bytes() for p in (phantom / "dicom").iterdir()}
    assert all(originals[pydicom.dcmread(p).SOPInstanceUID] == p.read_bytes() for p in stored)

    # The message for the worker is on the default queue.
    messages = redis.Redis.from_url(web.settings.redis_url).hvals("openmsk:default.msgs")
    assert any(json.loads(m)["args"] == [job.id] for m in messages)

    status = web.api().get(f"{web.url}{body['status_url']}", timeout=10).json()
    assert status["state"] == "queued" and status["queue_position"] == 1 and status["percent"] == 0
    assert [s["name"] for s in status["stages"]] == [
        "load",
        "preprocess",
        "infer",
        "postprocess",
        "write",
        "analyse",
        "deliver",
    ]
    assert all(s["state"] == "pending" for s in status["stages"])
    assert status["error"] is None and status["files"] == [] and status["expires_at"] is None


def test_several_dcm_files_in_one_request(web: Web, store: JobStore, phantom: Path) -> None:
    files = [(p.name, p.read_bytes()) for p in sorted((phantom / "dicom").iterdir())]
    response = upload(web, files, model="demo")
    assert response.status_code == 202, response.text
    job = store.get(response.json()["id"])
    assert len(list((web.data / job.input_path).iterdir())) == 40 and job.instance_count == 40


@pytest.mark.parametrize(
    ("make", "stored_as"),
    [
        (lambda ph: (ph / "labels.nii.gz").read_bytes(), "volume.nii.gz"),
        (lambda ph: gzip.decompress((ph / "labels.nii.gz").read_bytes()), "volume.nii"),
        (lambda ph: nrrd_bytes(), "volume.nrrd"),
        (lambda ph: zip_bytes({"inner/scan.data": (ph / "labels.nii.gz").read_bytes()}), "volume.nii.gz"),
    ],
    ids=["nifti-gz", "nifti", "nrrd", "zip-of-nifti"],
)
def test_volumes_are_stored_under_our_own_name(
    web: Web, store: JobStore, phantom: Path, make: Callable[[Path], bytes], stored_as: str
) -> None:
    data = make(phantom)
    response = upload(web, [("../../etc/passwd", data)])  # the client's name is never used
    assert response.status_code == 202, response.text
    job = store.get(response.json()["id"])
    assert job.input_path == f"uploads/{job.id}/{stored_as}"
    assert os.listdir(web.data / "uploads" / job.id) == [stored_as]
    if not stored_as.endswith(".gz") and not data.startswith(b"PK"):
        assert (web.data / job.input_path).read_bytes() == data


def test_several_series_are_listed_and_the_chosen_one_is_kept(
    web: Web, store: JobStore, phantom: Path, second_phantom: Path
) -> None:
    both = series_zip(phantom, second_phantom)
    response = upload(web, [("study.zip", both)])
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "SEVERAL_SERIES"
    listed = {s["series_uid"]: s for s in error["series"]}
    assert set(listed) == {series_uid(phantom), series_uid(second_phantom)}
    assert all(s["instances"] == 40 and s["modality"] == "MR" for s in listed.values())
    assert_nothing_left(web, store)

    wrong = upload(web, [("study.zip", both)], series_uid="1.2.3.4")
    assert wrong.status_code == 422 and error_of(wrong)["code"] == "SERIES_NOT_FOUND"
    assert_nothing_left(web, store)

    chosen = upload(web, [("study.zip", both)], series_uid=series_uid(second_phantom))
    assert chosen.status_code == 202, chosen.text
    job = store.get(chosen.json()["id"])
    assert job.series_uid == series_uid(second_phantom) and job.instance_count == 40
    assert len(list((web.data / job.input_path).iterdir())) == 40


# ----------------------------------------------------------------------------------------------- refusals


def _symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("series/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _spread_zip(entries: int, each_mb: int) -> bytes:
    """Entries that compress about 90× (below the ratio cap) and add up past the 16 MB expansion cap."""
    block = os.urandom(10_000) + bytes(each_mb * MB - 10_000)
    return zip_bytes({f"part{n}.bin": block for n in range(entries)})


def _single_slice(phantom: Path) -> bytes:
    return next((phantom / "dicom").iterdir()).read_bytes()


REFUSALS = {
    "zip-slip": (lambda ph: zip_bytes({"../../evil.dcm": _single_slice(ph)}), 422, "UNSAFE_ARCHIVE"),
    "absolute-path": (lambda ph: zip_bytes({"/etc/evil.dcm": _single_slice(ph)}), 422, "UNSAFE_ARCHIVE"),
    "symlink": (lambda ph: _symlink_zip(), 422, "UNSAFE_ARCHIVE"),
    "ratio-bomb": (lambda ph: zip_bytes({"zeros.dcm": bytes(50 * MB)}), 422, "UNSAFE_ARCHIVE"),
    "too-many-entries": (
        lambda ph: zip_bytes({f"f{n}": b"" for n in range(20_001)}, zipfile.ZIP_STORED),
        422,
        "UNSAFE_ARCHIVE",
    ),
    "too-large-unzipped": (lambda ph: _spread_zip(20, 1), 422, "UNSAFE_ARCHIVE"),
    "not-dicom": (lambda ph: b"just some text\n" * 100, 415, "INVALID_FORMAT"),
    "zip-of-junk": (
        lambda ph: zip_bytes({"notes.txt": b"hello", "image.jpg": b"\xff\xd8\xff" + bytes(100)}),
        415,
        "INVALID_FORMAT",
    ),
    "damaged-zip": (lambda ph: series_zip(ph)[:-200], 415, "INVALID_FORMAT"),
    "empty-file": (lambda ph: b"", 400, "EMPTY_FILE"),
    "one-2d-slice": (_single_slice, 422, "NOT_A_VOLUME"),
    "nrrd-2d": (lambda ph: nrrd_bytes(dimension=2), 422, "NOT_A_VOLUME"),
    "nrrd-detached": (lambda ph: nrrd_bytes(detached=True), 415, "INVALID_FORMAT"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_uploads_say_why_and_leave_nothing(
    web: Web, store: JobStore, phantom: Path, case: str
) -> None:
    make, status, code = REFUSALS[case]
    response = upload(web, [("upload.zip", make(phantom))])
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["code"] == code and error["message"] and error["hint"]
    assert_nothing_left(web, store)


def test_refused_requests_without_a_usable_file_or_model(web: Web, store: JobStore, phantom: Path) -> None:
    good = [("knee.zip", series_zip(phantom))]
    cases = [
        (
            web.api().post(
                f"{web.url}/api/jobs", data={"model": "demo"}, files={"other": ("x", b"1")}, timeout=30
            ),
            400,
            "NO_FILE",
        ),
        (
            web.api().post(f"{web.url}/api/jobs", json={"file": "x"}, timeout=30),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (upload(web, good, model="nonexistent"), 400, "UNKNOWN_MODEL"),
        (upload(web, good, model="broken"), 409, "MODEL_UNAVAILABLE"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert error_of(response)["code"] == code
    truncated = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n' + bytes(1000)
    response = web.api().post(
        f"{web.url}/api/jobs",
        data=truncated,
        timeout=30,
        headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
    )
    assert response.status_code == 400 and error_of(response)["code"] == "INCOMPLETE_UPLOAD"
    assert_nothing_left(web, store)


# ----------------------------------------------------------------------------------------------- size limit


def _multipart_head(web: Web, length: int | None) -> bytes:
    lines = [
        "POST /api/jobs HTTP/1.1",
        f"Host: 127.0.0.1:{web.settings.web_port}",
        f"Authorization: Bearer {TOKEN}",
        "Content-Type: multipart/form-data; boundary=XyZ",
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


PART_HEAD = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n\r\n'
PART_TAIL = b"\r\n--XyZ--\r\n"


def test_a_body_declared_too_large_is_refused_before_it_is_read(web: Web, store: JobStore) -> None:
    declared = 100 * MAX_UPLOAD_MB * MB
    chunks = (bytes(MB) for _ in range(100 * MAX_UPLOAD_MB))
    answer, sent = raw_request(web, _multipart_head(web, declared), chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < declared // 4  # refused early, not after reading it all
    assert_nothing_left(web, store)


def test_file_content_over_the_limit_is_cut_off_with_413(web: Web, store: JobStore) -> None:
    # Just over the file limit but within the body's allowance for multipart framing: the app counts it.
    body = PART_HEAD + bytes(MAX_UPLOAD_MB * MB + 1024) + PART_TAIL
    response = web.api().post(
        f"{web.url}/api/jobs",
        data=body,
        timeout=60,
        headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
    )
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "TOO_LARGE" and f"{MAX_UPLOAD_MB} MB" in error["message"]
    assert_nothing_left(web, store)


def test_a_chunked_body_is_cut_off_at_the_limit(web: Web, store: JobStore) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"%x\r\n%s\r\n" % (len(PART_HEAD), PART_HEAD)
        for _ in range(100 * MAX_UPLOAD_MB):
            yield b"%x\r\n%s\r\n" % (MB, bytes(MB))

    answer, sent = raw_request(web, _multipart_head(web, None), chunks())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 3 * MAX_UPLOAD_MB * MB
    assert_nothing_left(web, store)


# ----------------------------------------------------------------------------------------------- jobs


def _finished_job(web: Web, store: JobStore, *, model: str = "demo", seconds: float = 60.0) -> Job:
    """A job record as the worker leaves it, its files where the worker writes them (jobs/<id>/output)."""
    now = time.time()
    job = Job(
        source="scp",
        model=model,
        input_path="incoming/a/b",
        destinations=["orthanc"],
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        sop_uids=["1", "2", "3"],
    )
    output = web.data / "jobs" / job.id / "output"
    output.mkdir(parents=True)
    contents = {
        "seg.dcm": b"DICM-seg",
        "sr.dcm": b"DICM-sr",
        "labels.nii.gz": b"labels",
        "report.csv": b"tissue,volume\n",
        "preview.png": b"\x89PNG\r\n\x1a\n",
        "manifest.json": b"{}",
        "report.json": json.dumps(
            {
                "tissues": {
                    "femur": {"label": 1, "display_name": "Femur", "voxels": 10, "volume_mm3": 12345.6},
                    "femoral_cartilage": {
                        "label": 4,
                        "display_name": "Femoral cartilage",
                        "voxels": 5,
                        "volume_mm3": 2100.4,
                        "thickness_mm": {"mean": 2.1, "median": 2.0, "std": 0.3, "p95": 2.6},
                    },
                }
            }
        ).encode(),
    }
    for name, data in contents.items():
        (output / name).write_bytes(data)
    store.create(job)
    store.transition(job.id, JobState.QUEUED)
    start = now - seconds

    def finish(j: Job) -> None:
        j.state_times["running"] = start
        j.stages = {
            s: StageTiming(started_at=start + i, finished_at=start + i + 1)
            for i, s in enumerate(
                ("load", "preprocess", "infer", "postprocess", "write", "analyse", "deliver")
            )
        }
        j.stages["infer"].finished_at = start + 40
        j.files = [f"jobs/{j.id}/output/{name}" for name in contents]
        j.deliveries = {"orthanc": Delivery(status="done", attempts=1)}
        j.percent = 100.0
        j.stage = "deliver"

    store.transition(job.id, JobState.RUNNING)
    store.transition(job.id, JobState.DELIVERING, finish)
    store.transition(job.id, JobState.DONE, lambda j: j.state_times.__setitem__("done", now))
    return store.get(job.id)


def test_job_status_list_paging_and_eta(web: Web, store: JobStore, phantom: Path) -> None:
    done = _finished_job(web, store, seconds=60.0)
    ids = [upload(web, [("knee.zip", series_zip(phantom))]).json()["id"] for _ in range(3)]
    api = web.api()

    first = api.get(f"{web.url}/api/jobs/{ids[0]}", timeout=10).json()
    third = api.get(f"{web.url}/api/jobs/{ids[2]}", timeout=10).json()
    assert (first["queue_position"], third["queue_position"]) == (1, 3)
    # The mean of recent jobs of the model (60 s) per job ahead (no worker counts as one), plus its own run.
    assert first["eta_seconds"] == 60 and third["eta_seconds"] == 180

    finished = api.get(f"{web.url}/api/jobs/{done.id}", timeout=10).json()
    assert finished["state"] == "done" and finished["percent"] == 100 and finished["eta_seconds"] is None
    durations = {s["name"]: s["duration_s"] for s in finished["stages"]}
    assert durations["infer"] == pytest.approx(38.0) and durations["load"] == pytest.approx(1.0)
    assert finished["results_url"] == f"/api/jobs/{done.id}/results.zip"
    assert finished["expires_at"] == pytest.approx(done.state_times["done"] + 72 * 3600)

    page1 = api.get(f"{web.url}/api/jobs", params={"per_page": 2}, timeout=10).json()
    page2 = api.get(f"{web.url}/api/jobs", params={"per_page": 2, "page": 2}, timeout=10).json()
    assert (page1["total"], page1["pages"], len(page1["jobs"]), len(page2["jobs"])) == (4, 2, 2, 2)
    assert [j["id"] for j in page1["jobs"] + page2["jobs"]] == [*reversed(ids), done.id]  # newest first
    queued = api.get(f"{web.url}/api/jobs", params={"state": "queued"}, timeout=10).json()
    assert {j["id"] for j in queued["jobs"]} == set(ids) and queued["state"] == "queued"
    for params, code in (
        ({"state": "lost"}, "BAD_STATE"),
        ({"page": "0"}, "BAD_PAGE"),
        ({"per_page": "1000"}, "BAD_PAGE"),
    ):
        response = api.get(f"{web.url}/api/jobs", params=params, timeout=10)
        assert response.status_code == 400 and error_of(response)["code"] == code
    assert api.get(f"{web.url}/api/jobs/{'0' * 32}", timeout=10).status_code == 404
    assert api.get(f"{web.url}/api/jobs/..%2F..%2Fsecrets", timeout=10).status_code == 404

    stats = api.get(f"{web.url}/api/stats", timeout=10).json()
    assert stats["processed_total"] == 1 and stats["queue_length"] == 3
    assert stats["mean_seconds_by_model"] == {"demo": 60.0}


def test_files_and_results_zip(web: Web, store: JobStore, phantom: Path) -> None:
    job = _finished_job(web, store)
    api = web.api()
    seg = api.get(f"{web.url}/api/jobs/{job.id}/files/seg.dcm", timeout=10)
    assert seg.status_code == 200 and seg.content == b"DICM-seg"
    assert seg.headers["Content-Type"] == "application/dicom"
    assert seg.headers["Content-Disposition"].startswith("attachment")
    preview = api.get(f"{web.url}/api/jobs/{job.id}/files/preview.png", timeout=10)
    assert preview.headers["Content-Type"] == "image/png" and "attachment" not in preview.headers.get(
        "Content-Disposition", ""
    )
    for name in ("missing.dcm", "..%2F..%2F..%2Fsecrets%2Fweb_secret_key", "%2Fetc%2Fpasswd"):
        response = api.get(f"{web.url}/api/jobs/{job.id}/files/{name}", timeout=10)
        assert response.status_code == 404, name

    response = api.get(f"{web.url}/api/jobs/{job.id}/results.zip", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert sorted(archive.namelist()) == sorted(
            [
                "seg.dcm",
                "sr.dcm",
                "labels.nii.gz",
                "report.csv",
                "preview.png",
                "manifest.json",
                "report.json",
            ]
        )
        assert archive.read("seg.dcm") == b"DICM-seg"

    queued = upload(web, [("knee.zip", series_zip(phantom))]).json()["id"]
    response = api.get(f"{web.url}/api/jobs/{queued}/results.zip", timeout=10)
    assert response.status_code == 409 and error_of(response)["code"] == "NOT_DONE"


def test_metrics(web: Web, store: JobStore, phantom: Path) -> None:
    job = _finished_job(web, store)
    upload(web, [("knee.zip", series_zip(phantom))])
    for _ in range(2):  # a second scrape counts nothing twice
        text = requests.get(f"{web.url}/metrics", timeout=10).text
        assert 'openmsk_jobs{state="done"} 1' in text and 'openmsk_jobs{state="queued"} 1' in text
        assert 'openmsk_stage_duration_seconds_bucket{stage="infer",model="demo",le="30"} 0' in text
        assert 'openmsk_stage_duration_seconds_bucket{stage="infer",model="demo",le="60"} 1' in text
        assert 'openmsk_stage_duration_seconds_bucket{stage="infer",model="demo",le="+Inf"} 1' in text
        assert 'openmsk_stage_duration_seconds_count{stage="load",model="demo"} 1' in text
        assert 'openmsk_instances_received_total{source="scp"} 3' in text
        assert 'openmsk_instances_received_total{source="upload"} 40' in text
        assert 'openmsk_deliveries_total{destination="orthanc",result="done"} 1' in text
    assert job.id not in text


# ----------------------------------------------------------------------------------------------- protection


def test_uploads_are_rate_limited_per_client(web: Web, store: JobStore) -> None:
    """Wired into the upload route (the window arithmetic itself: tests/test_rate_limit.py, own clock)."""
    api = web.api(OTHER_TOKEN)
    refused = 0  # refused uploads count too; a minute boundary on the way allows at most one more window
    while (response := api.post(f"{web.url}/api/jobs", timeout=10)).status_code == 415 and refused <= 60:
        refused += 1
    assert response.status_code == 429 and error_of(response)["code"] == "RATE_LIMITED"
    assert 30 <= refused <= 60
    assert 0 < int(response.headers["Retry-After"]) <= 60
    assert web.api(TOKEN).post(f"{web.url}/api/jobs", timeout=10).status_code == 415  # another client


def test_security_headers_and_plain_errors(web: Web, store: JobStore) -> None:
    for response in (
        requests.get(f"{web.url}/login", timeout=10),
        web.api().get(f"{web.url}/api/jobs", timeout=10),
        requests.get(f"{web.url}/nowhere", timeout=10),
    ):
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Cache-Control"] == "no-store"
        assert "Traceback" not in response.text and "Werkzeug" not in response.text
    page = requests.get(f"{web.url}/nowhere", timeout=10)
    assert page.status_code == 404 and page.headers["Content-Type"].startswith("text/html")
    wrong = web.api().delete(f"{web.url}/api/jobs", timeout=10)
    assert wrong.status_code == 405 and error_of(wrong)["code"] == "METHOD_NOT_ALLOWED"
    missing = web.api().get(f"{web.url}/api/nothing", timeout=10)
    assert missing.status_code == 404 and error_of(missing)["code"] == "NOT_FOUND"


def _csrf(page: str) -> str:
    marker = 'name="csrf-token" content="'
    return page.split(marker, 1)[1].split('"', 1)[0]


def _sign_in(web: Web, user: str, password: str) -> requests.Session:
    browser = requests.Session()
    token = _csrf(browser.get(f"{web.url}/login", timeout=10).text)
    response = browser.post(
        f"{web.url}/login",
        data={"user": user, "password": password, "csrf_token": token, "next": "/jobs"},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 302, response.text
    assert response.headers["Location"] == "/jobs"
    return browser


def test_sign_in_session_cookie_and_csrf(web: Web, store: JobStore, phantom: Path) -> None:
    response = requests.get(f"{web.url}/jobs", allow_redirects=False, timeout=10)
    assert response.status_code == 302 and response.headers["Location"].startswith("/login?next=/jobs")

    browser = requests.Session()
    token = _csrf(browser.get(f"{web.url}/login", timeout=10).text)
    no_csrf = browser.post(f"{web.url}/login", data={"user": USER, "password": PASSWORD}, timeout=10)
    assert no_csrf.status_code == 403
    wrong = browser.post(
        f"{web.url}/login", data={"user": USER, "password": "nope", "csrf_token": token}, timeout=10
    )
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    evil = browser.post(
        f"{web.url}/login",
        data={"user": USER, "password": PASSWORD, "csrf_token": token, "next": "//evil.example/"},
        allow_redirects=False,
        timeout=10,
    )
    assert evil.status_code == 302 and evil.headers["Location"] == "/"
    cookie = evil.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie

    browser = _sign_in(web, USER, PASSWORD)
    assert "Jobs" in browser.get(f"{web.url}/jobs", timeout=10).text
    page = browser.get(f"{web.url}/", timeout=10).text
    assert '<option value="demo" selected' in page and "(default)" in page
    assert browser.get(f"{web.url}/api/jobs", timeout=10).status_code == 200  # the pages' scripts use the API
    files = {"file": ("knee.zip", series_zip(phantom))}
    refused = browser.post(f"{web.url}/api/jobs", files=files, timeout=30)
    assert refused.status_code == 403 and error_of(refused)["code"] == "CSRF_FAILED"
    csrf = _csrf(page)
    accepted = browser.post(f"{web.url}/api/jobs", files=files, headers={"X-CSRF-Token": csrf}, timeout=30)
    assert accepted.status_code == 202

    # The form without scripts: CSRF in the multipart body.
    form = browser.post(f"{web.url}/upload", files=files, data={"csrf_token": "forged"}, timeout=30)
    assert form.status_code == 403
    form = browser.post(
        f"{web.url}/upload", files=files, data={"csrf_token": csrf}, allow_redirects=False, timeout=30
    )
    assert form.status_code == 303 and form.headers["Location"].startswith("/jobs/")
    assert store.count() == 2

    token_browser = _sign_in(web, "", TOKEN)  # an API token as the password
    assert token_browser.get(f"{web.url}/api/jobs", timeout=10).status_code == 200
    token_browser.post(
        f"{web.url}/logout", data={"csrf_token": _csrf(token_browser.get(f"{web.url}/jobs").text)}
    )
    assert token_browser.get(f"{web.url}/api/jobs", timeout=10).status_code == 401


def test_job_pages(web: Web, store: JobStore) -> None:
    browser = _sign_in(web, USER, PASSWORD)
    done = _finished_job(web, store)
    page = browser.get(f"{web.url}/jobs/{done.id}", timeout=10).text
    assert "Femoral cartilage" in page and "12,346" in page and "2.10" in page and "2.60" in page
    assert f"/api/jobs/{done.id}/files/preview.png" in page and f"/api/jobs/{done.id}/results.zip" in page
    assert "are deleted on" in page

    failed = Job(source="upload", model="demo", input_path="uploads/x/dicom")
    store.create(failed)
    store.fail(failed.id, "DICOM_ERROR", "two instances share one slice position", "Send the series again.")
    page = browser.get(f"{web.url}/jobs/{failed.id}", timeout=10).text
    assert "two instances share one slice position" in page and "Send the series again." in page

    listing = browser.get(f"{web.url}/jobs", params={"state": "failed"}, timeout=10).text
    assert failed.id[:8] in listing and done.id[:8] not in listing
    assert "done today" in listing and "demo" in listing


# ----------------------------------------------------------------------------------------------- elsewhere


def test_redis_down_is_a_json_503_without_a_traceback(
    settings: Settings, registry: Path, tmp_path: Path
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    down = settings.model_copy(update={"redis_url": dead, "api_tokens": [TOKEN], "model_registry": registry})
    proc = start_web(down, tmp_path / "web.log")
    try:
        response = requests.get(
            f"http://127.0.0.1:{down.web_port}/api/jobs",
            timeout=30,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 503 and error_of(response)["code"] == "REDIS_UNAVAILABLE"
    finally:
        stop_web(proc)
    assert "Traceback" not in (tmp_path / "web.log").read_text()


def _create_running(store: JobStore, job: Job) -> None:
    """A job record as the worker leaves it when it starts: created, queued, running."""
    store.create(job)
    store.transition(job.id, JobState.QUEUED)
    store.transition(job.id, JobState.RUNNING)


def test_retention_removes_expired_files_and_keeps_records(
    settings: Settings, redis_client: redis.Redis
) -> None:
    store = JobStore(redis_client)
    data = settings.data_path
    long_ago = time.time() - 80 * 3600
    old = Job(source="upload", model="demo", input_path="uploads/old/dicom", created_at=long_ago)
    running = Job(source="upload", model="demo", input_path="uploads/run/dicom", created_at=long_ago)
    for job in (old, running):
        (data / "uploads" / job.id / "dicom").mkdir(parents=True)
        (data / "jobs" / job.id / "output").mkdir(parents=True)
        _create_running(store, job)
    store.transition(
        old.id, JobState.DELIVERING, lambda j: setattr(j, "files", [f"jobs/{j.id}/output/seg.dcm"])
    )
    store.transition(old.id, JobState.DONE)
    orphan, in_progress = data / "uploads" / "orphan", data / "uploads" / "in-progress"
    for folder in (orphan, in_progress):
        folder.mkdir()
    os.utime(orphan, (long_ago, long_ago))

    report = cleanup(settings, store)
    assert (report.jobs, report.orphans) == (0, 1)  # the job was done just now: its files stay for 72 h
    assert not orphan.exists() and in_progress.exists()
    store.update(old.id, lambda j: j.state_times.__setitem__("done", time.time() - 73 * 3600))
    report = cleanup(settings, store)
    assert (report.jobs, report.orphans) == (1, 0)
    assert not (data / "uploads" / old.id).exists() and not (data / "jobs" / old.id).exists()
    assert store.get(old.id).files == [] and store.get(old.id).state is JobState.DONE
    assert (data / "uploads" / running.id).exists() and (data / "jobs" / running.id).exists()


def test_retention_removes_received_series_nothing_needs(
    settings: Settings, redis_client: redis.Redis
) -> None:
    from openmsk.forwarding import ForwardOrder, ForwardOutbox
    from openmsk.jobs import LATEST_PREFIX

    store = JobStore(redis_client)
    data = settings.data_path
    long_ago = time.time() - 80 * 3600
    folders = {}
    for name in ("expired", "recent-job", "forwarding", "no-job", "arriving"):
        series = data / "incoming" / "1.2.3" / f"1.2.3.{len(folders) + 1}"
        series.mkdir(parents=True)
        (series / "1.dcm").write_bytes(b"instance")
        if name != "arriving":
            os.utime(series / "1.dcm", (long_ago, long_ago))
            os.utime(series, (long_ago, long_ago))
        folders[name] = series
    for name, finished in (("expired", time.time() - 73 * 3600), ("recent-job", time.time() - 3600)):
        series = folders[name]
        job = Job(source="scp", model="demo", series_uid=series.name, created_at=long_ago,
                  input_path=f"incoming/1.2.3/{series.name}")  # fmt: skip
        _create_running(store, job)
        store.transition(job.id, JobState.FAILED)
        store.update(job.id, lambda j, t=finished: j.state_times.__setitem__("failed", t))
        redis_client.hset(f"{LATEST_PREFIX}{series.name}:demo", mapping={"job": job.id})
    forwarding = folders["forwarding"]
    ForwardOutbox(data).put(
        ForwardOrder(
            study_uid="1.2.3",
            series_uid=forwarding.name,
            files={"1": "1.dcm"},
            folder=f"incoming/1.2.3/{forwarding.name}",
            destinations=["orthanc"],
        )
    )

    report = cleanup(settings, store)
    assert report.series == 2
    gone = {name for name, folder in folders.items() if not folder.exists()}
    assert gone == {"expired", "no-job"}  # the others: a job within retention, the archive, new images
    assert not (data / "expired").exists() or not any((data / "expired").iterdir())
    assert (folders["arriving"] / "1.dcm").read_bytes() == b"instance"


def test_api_token_is_generated_once_and_configured_tokens_win(settings: Settings) -> None:
    token, generated = ensure_api_token(settings)
    path = settings.data_path / "secrets" / "api_token"
    assert generated and len(token) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_api_token(settings) == (token, True)
    configured = settings.model_copy(update={"api_tokens": ["mine"]})
    assert ensure_api_token(configured) == ("mine", False)


def test_hash_password_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "openmsk", "web", "--hash-password"],
        input="s3cret-pass\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert check_password_hash(result.stdout.strip(), "s3cret-pass")
