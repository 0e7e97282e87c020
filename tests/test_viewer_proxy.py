"""The viewer's server (``web.viewer``) as a real process against the test Orthanc and Redis: sign-in, the OHIF
build with its index.html fallback and generated app-config.js, the streaming DICOMweb proxy with the node's
Orthanc credentials, the viewer's own security headers, and the links that lead to it.

The study is a phantom series plus the SEG that ``worker.dicom.seg.write_seg`` makes of its ground truth: exactly the
object the worker delivers, without waiting for inference. It is removed from Orthanc at the end.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest
import requests

from openmsk.config import Settings, load_settings
from openmsk.jobs import Delivery, Job, JobState, JobStore
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.managed.process import free_port
from openmsk.managed.redis import ManagedRedis
from openmsk.phantom import generate, write_series
from tests.conftest import ORTHANC_PASSWORD, ORTHANC_USER
from tests.processes import settings_env, wait_for
from web import create_app
from web.auth import hash_password
from web.viewer import VIEWER_CSP, app_config, app_config_js, create_viewer_app, study_link
from worker.dicom.seg import write_seg
from worker.volume import load_series, read_series

TOKEN = "viewer-test-token-0123456789"
USER, PASSWORD = "radiologist", "patella-alta-42"
SECRET = "viewer-test-secret-key-0123456789abcdef"
PHANTOM_SEED = 8  # no other test uses it: this study is ours alone in the shared Orthanc
MODEL, MODEL_VERSION = "demo", "1.0"
DIST = Path(__file__).resolve().parents[1] / "node_modules" / "@ohif" / "app" / "dist"


def assert_dist_installed() -> None:
    """`make test` installs the OHIF build; its absence is a failed install step, not a reason to skip."""
    assert (DIST / "index.html").is_file(), "OHIF not installed: `make install` runs npm ci in the checkout"


# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class Study:
    """A phantom study in Orthanc: the MR series and the node's SEG of its ground truth."""

    study_uid: str
    mr_series_uid: str
    seg: pydicom.Dataset
    segments: list[str]  # segment labels in segment-number order
    orthanc_id: str = ""


@dataclass
class Viewer:
    settings: Settings
    proc: subprocess.Popen
    log: Path
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.settings.viewer_port}"


def make_study(folder: Path) -> tuple[list[Path], Path]:
    """Write a phantom series and the SEG of its ground-truth labels; return the files to upload."""
    phantom = generate(seed=PHANTOM_SEED, size="small")
    files = write_series(phantom, folder)["dicom_files"]
    volume = load_series(read_series(folder / "dicom"))
    seg = write_seg(volume, phantom.labels, MODEL, MODEL_VERSION, folder / "seg.dcm")
    assert seg.path is not None
    return list(files), seg.path


def upload_study(orthanc: ManagedOrthanc, folder: Path) -> Study:
    """Put the phantom study into Orthanc through its REST API (``POST /instances``)."""
    files, seg_path = make_study(folder)
    auth = (orthanc.user, orthanc.password)
    with requests.Session() as session:
        for path in [*files, seg_path]:
            response = session.post(f"{orthanc.url}/instances", data=path.read_bytes(), auth=auth, timeout=30)
            response.raise_for_status()
        study_id = response.json()["ParentStudy"]
    seg = pydicom.dcmread(seg_path)
    return Study(
        study_uid=str(seg.StudyInstanceUID),
        mr_series_uid=str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID),
        seg=seg,
        segments=[str(item.SegmentLabel) for item in seg.SegmentSequence],
        orthanc_id=study_id,
    )


def delete_study(orthanc: ManagedOrthanc, study: Study) -> None:
    requests.delete(
        f"{orthanc.url}/studies/{study.orthanc_id}", auth=(orthanc.user, orthanc.password), timeout=30
    )


def viewer_settings(root: Path, redis_url: str, orthanc: ManagedOrthanc, **changes: object) -> Settings:
    """A node's settings for the viewer: the test Redis and Orthanc, a user and a token, free ports."""
    values: dict[str, object] = {
        "data_dir": root / "data",
        "redis_url": redis_url,
        "orthanc_url": orthanc.url,
        "orthanc_user": ORTHANC_USER,
        "orthanc_password": ORTHANC_PASSWORD,
        "web_host": "127.0.0.1",
        "web_port": free_port(),
        "viewer_port": free_port(),
        "api_tokens": [TOKEN],
        "web_users": f"{USER}:{hash_password(PASSWORD)}",
        "secret_key": SECRET,
    }
    values.update(changes)
    return load_settings(**values)


def start_viewer(settings: Settings, log: Path) -> Viewer:
    """The viewer's server as ``openmsk up`` starts it, once its sign-in page answers."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "openmsk", "viewer"],
            env=settings_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    viewer = Viewer(settings, proc, log)
    try:
        wait_for(
            lambda: requests.get(f"{viewer.url}/openmsk/login", timeout=5).status_code == 200,
            30,
            "viewer answering",
        )
    except AssertionError:
        proc.kill()
        raise AssertionError(log.read_text()) from None
    return viewer


def stop_viewer(viewer: Viewer) -> None:
    viewer.proc.terminate()
    try:
        viewer.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        viewer.proc.kill()
        viewer.proc.wait(timeout=10)


def raw_get(viewer: Viewer, path: str, session_cookie: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (requests would resolve dot segments before sending)."""
    connection = http.client.HTTPConnection("127.0.0.1", viewer.settings.viewer_port, timeout=10)
    try:
        connection.request("GET", path, headers={"Cookie": f"openmsk_session={session_cookie}"})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def csrf_of(page: str) -> str:
    return page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


def sign_in(base: str, user: str, password: str, next_path: str = "/") -> requests.Session:
    """A browser-like session signed in through the viewer's own form."""
    browser = requests.Session()
    token = csrf_of(browser.get(f"{base}/openmsk/login", timeout=10).text)
    response = browser.post(
        f"{base}/openmsk/login",
        data={"user": user, "password": password, "csrf_token": token, "next": next_path},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 302, response.text
    assert response.headers["Location"] == next_path
    return browser


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def study(orthanc_server: ManagedOrthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    made = upload_study(orthanc_server, tmp_path_factory.mktemp("viewer-study"))
    yield made
    delete_study(orthanc_server, made)


@pytest.fixture(scope="module")
def viewer(
    redis_server: ManagedRedis, orthanc_server: ManagedOrthanc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Viewer]:
    root = tmp_path_factory.mktemp("viewer")
    running = start_viewer(viewer_settings(root, redis_server.url, orthanc_server), root / "viewer.log")
    yield running
    stop_viewer(running)


# ---------------------------------------------------------------------------------------------- sign-in


def test_everything_needs_the_nodes_sign_in(viewer: Viewer, study: Study) -> None:
    page = requests.get(f"{viewer.url}/viewer?StudyInstanceUIDs={study.study_uid}&x=1", allow_redirects=False)
    assert page.status_code == 302
    location = urlsplit(page.headers["Location"])
    assert location.path == "/openmsk/login"
    assert parse_qs(location.query) == {"next": [f"/viewer?StudyInstanceUIDs={study.study_uid}&x=1"]}
    for path in ("/", "/app-config.js", "/segmentation"):
        assert requests.get(f"{viewer.url}{path}", allow_redirects=False, timeout=10).status_code == 302
    data = requests.get(f"{viewer.url}/dicom-web/studies", timeout=10)
    assert data.status_code == 401 and data.json()["error"]["code"] == "UNAUTHORIZED"
    assert "WWW-Authenticate" not in data.headers  # no browser password prompt, ever
    wado = requests.get(f"{viewer.url}/wado", params={"requestType": "WADO"}, timeout=10)
    assert wado.status_code == 401
    # Orthanc's own credentials are not the node's: they open nothing here.
    basic = requests.get(f"{viewer.url}/dicom-web/studies", auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=10)
    assert basic.status_code == 401

    browser = requests.Session()
    token = csrf_of(browser.get(f"{viewer.url}/openmsk/login", timeout=10).text)
    assert (
        browser.post(f"{viewer.url}/openmsk/login", data={"user": USER, "password": PASSWORD}).status_code
        == 403
    )
    wrong = browser.post(
        f"{viewer.url}/openmsk/login",
        data={"user": USER, "password": "nope", "csrf_token": token},
        timeout=10,
    )
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    evil = browser.post(
        f"{viewer.url}/openmsk/login",
        data={"user": USER, "password": PASSWORD, "csrf_token": token, "next": "//evil.example/"},
        allow_redirects=False,
        timeout=10,
    )
    assert evil.status_code == 302 and evil.headers["Location"] == "/"

    browser = sign_in(viewer.url, USER, PASSWORD, f"/viewer?StudyInstanceUIDs={study.study_uid}")
    assert browser.get(f"{viewer.url}/dicom-web/studies", timeout=10).status_code == 200
    tokened = sign_in(viewer.url, "", TOKEN)  # an API token as the password, as on the web pages
    assert tokened.get(f"{viewer.url}/dicom-web/studies", timeout=10).status_code == 200
    logout = tokened.post(
        f"{viewer.url}/openmsk/logout",
        data={"csrf_token": csrf_of(tokened.get(f"{viewer.url}/openmsk/login").text)},
    )
    assert logout.status_code == 200  # back on the sign-in form
    assert tokened.get(f"{viewer.url}/dicom-web/studies", timeout=10).status_code == 401


def test_a_session_from_the_web_pages_opens_the_viewer(viewer: Viewer) -> None:
    """Cookies belong to a host, not a port: signing in on the web pages signs in on the viewer's port too."""
    web = create_app(viewer.settings).test_client()
    page = web.get("/login").get_data(as_text=True)
    signed = web.post("/login", data={"user": USER, "password": PASSWORD, "csrf_token": csrf_of(page)})
    assert signed.status_code == 302
    cookie = web.get_cookie("openmsk_session")
    assert cookie is not None
    response = requests.get(
        f"{viewer.url}/dicom-web/studies", cookies={"openmsk_session": cookie.value}, timeout=10
    )
    assert response.status_code == 200


# --------------------------------------------------------------------------------------- the OHIF build


def test_build_index_fallback_and_generated_config(viewer: Viewer) -> None:
    assert_dist_installed()
    browser = sign_in(viewer.url, USER, PASSWORD)
    index = (DIST / "index.html").read_text()
    for path in ("/", "/viewer", "/segmentation", "/viewer/dicomjson"):
        response = browser.get(f"{viewer.url}{path}", timeout=10)
        assert response.status_code == 200 and response.text == index, path
        assert response.headers["Cache-Control"] == "no-store"
    bundle = next(DIST.glob("app.bundle.*.js")).name
    script = browser.get(f"{viewer.url}/{bundle}", timeout=30)
    assert script.status_code == 200 and script.headers["Content-Type"].startswith("text/javascript")
    assert "private" in script.headers["Cache-Control"]
    wasm = next(DIST.glob("*.wasm")).name
    assert browser.get(f"{viewer.url}/{wasm}", timeout=30).headers["Content-Type"] == "application/wasm"
    missing = browser.get(f"{viewer.url}/no-such-bundle.js", timeout=10)
    assert missing.status_code == 404  # a script tag must never get index.html
    for path in ("/../../../../etc/passwd", "/..%2f..%2f..%2f..%2fetc/passwd", "/assets/../../../LICENSE"):
        _, body = raw_get(viewer, path, browser.cookies["openmsk_session"])
        assert b"root:" not in body and body != (DIST.parent / "LICENSE").read_bytes(), path

    config = browser.get(f"{viewer.url}/app-config.js", timeout=10)
    assert config.status_code == 200 and config.headers["Content-Type"].startswith("text/javascript")
    assert config.text == app_config_js(viewer.settings) != (DIST / "app-config.js").read_text()

    headers = browser.get(f"{viewer.url}/viewer", timeout=10).headers
    assert headers["Content-Security-Policy"] == VIEWER_CSP
    assert "frame-ancestors 'none'" in VIEWER_CSP and "object-src 'none'" in VIEWER_CSP
    assert "https:" not in VIEWER_CSP and "*" not in VIEWER_CSP  # nothing from other origins
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"


def test_app_config_has_one_read_only_data_source_through_the_proxy(settings: Settings) -> None:
    config = app_config(settings)
    assert config["defaultDataSourceName"] == "openmsk" and len(config["dataSources"]) == 1
    source = config["dataSources"][0]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    options = source["configuration"]
    assert options["friendlyName"] == f"OpenMSK Node {settings.scp_ae_title}"
    assert options["qidoRoot"] == options["wadoRoot"] == "/dicom-web" and options["wadoUriRoot"] == "/wado"
    assert options["staticWado"] is False
    assert options["imageRendering"] == options["thumbnailRendering"] == "wadors"
    assert options["supportsReject"] is False and options["dicomUploadEnabled"] is False
    assert "singlepart" not in options and "transform" not in options["bulkDataURI"]  # S3-style options

    node = shutil.which("node")
    assert node is not None, "node is missing: `make install` needs it for the OHIF build too"
    # The served script is JavaScript that sets exactly this object.
    script = app_config_js(settings) + "\nconsole.log(JSON.stringify(window.config));"
    result = subprocess.run(
        [node, "-e", f"var window = {{}};\n{script}"], capture_output=True, text=True, timeout=30, check=True
    )
    assert json.loads(result.stdout) == config


def test_without_the_build_the_viewer_says_how_to_install_it(
    viewer: Viewer, study: Study, tmp_path: Path
) -> None:
    settings = viewer.settings.model_copy(update={"viewer_dist": tmp_path / "missing"})
    client = create_viewer_app(settings).test_client()
    client.set_cookie("openmsk_session", _session_cookie(viewer.settings))
    page = client.get("/viewer", headers={"Accept": "text/html"})
    assert page.status_code == 503
    text = page.get_data(as_text=True)
    assert "npm ci --omit=dev --ignore-scripts" in text and "OPENMSK_VIEWER_DIST" in text
    assert client.get("/app-config.js").status_code == 503
    # The proxy does not need the build.
    studies = client.get("/dicom-web/studies", query_string={"StudyInstanceUID": study.study_uid})
    assert studies.status_code == 200 and len(studies.get_json()) == 1


def _session_cookie(settings: Settings) -> str:
    web = create_app(settings).test_client()
    page = web.get("/login").get_data(as_text=True)
    web.post("/login", data={"user": USER, "password": PASSWORD, "csrf_token": csrf_of(page)})
    cookie = web.get_cookie("openmsk_session")
    assert cookie is not None
    return cookie.value


# ------------------------------------------------------------------------------------------------ proxy


def test_dicomweb_through_the_proxy_names_the_viewers_origin(viewer: Viewer, study: Study) -> None:
    browser = sign_in(viewer.url, USER, PASSWORD)
    found = browser.get(f"{viewer.url}/dicom-web/studies", params={"StudyInstanceUID": study.study_uid})
    assert found.status_code == 200 and found.headers["Content-Type"].startswith("application/dicom+json")
    assert "no-store" in found.headers["Cache-Control"]
    (row,) = found.json()
    assert row["0020000D"]["Value"] == [study.study_uid]
    assert sorted(row["00080061"]["Value"]) == ["MR", "SEG"]
    # Orthanc writes URLs into its answers: they must point at this origin (the proxy), not at Orthanc.
    assert row["00081190"]["Value"][0] == f"{viewer.url}/dicom-web/studies/{study.study_uid}"

    seg_series = study.seg.SeriesInstanceUID
    base = f"{viewer.url}/dicom-web/studies/{study.study_uid}/series/{seg_series}"
    metadata = browser.get(f"{base}/metadata", timeout=30)
    assert metadata.status_code == 200
    labels = [item["00620005"]["Value"][0] for item in metadata.json()[0]["00620002"]["Value"]]
    assert labels == study.segments

    # WADO-RS of the SEG instance, as OHIF loads it: multipart, the whole Part 10 object, byte for byte.
    instance = browser.get(
        f"{base}/instances/{study.seg.SOPInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=30,
    )
    assert instance.status_code == 200 and instance.headers["Content-Type"].startswith("multipart/related")
    assert len(instance.content) > len(study.seg.PixelData)
    assert study.seg.PixelData in instance.content

    # A rendered frame (thumbnails) and WADO-URI.
    mr = f"{viewer.url}/dicom-web/studies/{study.study_uid}/series/{study.mr_series_uid}"
    instances = browser.get(f"{mr}/instances", timeout=30).json()
    sop = instances[0]["00080018"]["Value"][0]
    rendered = browser.get(f"{mr}/instances/{sop}/rendered", headers={"Accept": "image/jpeg"}, timeout=30)
    assert rendered.status_code == 200 and rendered.content[:2] == b"\xff\xd8"
    # Orthanc's WADO-URI does not decode %2F in contentType; the query goes through exactly as it was written.
    query = f"requestType=WADO&studyUID={study.study_uid}&seriesUID={study.mr_series_uid}&objectUID={sop}"
    wado = browser.get(f"{viewer.url}/wado?{query}&contentType=application/dicom", timeout=30)
    assert wado.status_code == 200 and wado.content[128:132] == b"DICM"

    missing = browser.get(f"{viewer.url}/dicom-web/studies/1.2.3.4/metadata", timeout=10)
    assert missing.status_code == 404  # Orthanc's own answer, passed on


def test_the_proxy_is_read_only_and_stays_under_its_roots(viewer: Viewer, study: Study) -> None:
    browser = sign_in(viewer.url, USER, PASSWORD)
    cookie = browser.cookies["openmsk_session"]
    for method in ("POST", "PUT", "DELETE"):
        response = browser.request(method, f"{viewer.url}/dicom-web/studies/{study.study_uid}", timeout=10)
        assert response.status_code == 405, method
    still_there = requests.get(
        f"{viewer.settings.orthanc_url}/studies/{study.orthanc_id}",
        auth=(ORTHANC_USER, ORTHANC_PASSWORD),
        timeout=10,
    )
    assert still_there.status_code == 200

    # Dot segments, plain or percent-encoded, never reach Orthanc's REST API above /dicom-web.
    for path in (
        "/dicom-web/../studies",
        "/dicom-web/%2e%2e/studies",
        "/wado/../system",
        "/dicom-web/studies/..%2f..%2fsystem",
    ):
        status, body = raw_get(viewer, path, cookie)
        assert status == 404, (path, status, body[:200])
        assert b"OpenMSK Orthanc" not in body and b"ParentStudy" not in body


def test_traversal_and_method_tampering_change_nothing_in_orthanc(viewer: Viewer, study: Study) -> None:
    """Beyond the above: double-encoded and deeper dot segments, every unsafe method on both roots, and the
    method-override headers some frameworks honour — refused, and Orthanc holds exactly what it held."""
    auth = (ORTHANC_USER, ORTHANC_PASSWORD)
    orthanc = viewer.settings.orthanc_url

    def holdings() -> tuple[dict, list[str]]:
        counts = requests.get(f"{orthanc}/statistics", auth=auth, timeout=10).json()
        return {k: counts[k] for k in ("CountPatients", "CountStudies", "CountInstances")}, sorted(
            requests.get(f"{orthanc}/studies", auth=auth, timeout=10).json()
        )

    before = holdings()
    browser = sign_in(viewer.url, USER, PASSWORD)
    cookie = browser.cookies["openmsk_session"]
    for path in (
        "/dicom-web/../../tools/reset",
        "/dicom-web/studies/../../../tools/find",
        "/dicom-web/%2e%2e/%2e%2e/tools/reset",
        "/dicom-web/%2E%2E/system",
        "/dicom-web/%252e%252e/system",
        "/dicom-web/studies/%252e%252e%252f%252e%252e%252fsystem",
        "/wado/..%2f..%2ftools%2freset",
        "/dicom-web/studies/..\\..\\system",
        "/dicom-web/.%2e/system",
    ):
        status, body = raw_get(viewer, path, cookie)
        assert status in (400, 404), (path, status, body[:200])
        assert b"OpenMSK Orthanc" not in body and b"DicomAet" not in body, path
    study_url = f"{viewer.url}/dicom-web/studies/{study.study_uid}"
    for url in (
        study_url,
        f"{viewer.url}/dicom-web",
        f"{viewer.url}/wado",
        f"{viewer.url}/wado?requestType=WADO",
    ):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert browser.request(method, url, timeout=10).status_code == 405, (method, url)
    for header in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
        # A read stays a read (the header never reaches Orthanc), a write stays refused.
        read = browser.get(f"{study_url}/series", headers={header: "DELETE"}, timeout=30)
        assert read.status_code == 200, header
        assert browser.post(study_url, headers={header: "GET"}, timeout=10).status_code == 405, header
    assert holdings() == before


def test_opening_a_study_is_audited_once_per_session(viewer: Viewer, study: Study) -> None:
    log = viewer.settings.data_path / "audit" / "audit.log"

    def viewed() -> list[dict]:
        lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [
            line
            for line in lines
            if line["kind"] == "study-viewed" and line["objects"]["study"] == study.study_uid
        ]

    already = len(viewed())
    browser = sign_in(viewer.url, USER, PASSWORD)
    assert browser.get(f"{viewer.url}/dicom-web/studies", params={"StudyInstanceUID": study.study_uid}).ok
    assert len(viewed()) == already  # a search opens nothing
    base = f"{viewer.url}/dicom-web/studies/{study.study_uid}"
    for path in (
        "/series",
        f"/series/{study.mr_series_uid}/metadata",
        f"/series/{study.mr_series_uid}/instances",
    ):
        assert browser.get(base + path, timeout=30).status_code == 200
    (line,) = viewed()[already:]  # three requests of one session: one line
    assert line["event_id"] == "DCM 110103" and line["action"] == "R" and line["outcome"] == 0
    assert line["participants"] == [{"role": "user", "principal": f"user:{USER}", "address": "127.0.0.1"}]
    other = sign_in(viewer.url, "", TOKEN)
    assert other.get(f"{base}/series", timeout=30).status_code == 200
    assert len(viewed()) == already + 2  # another session: its own line
    assert other.get(f"{viewer.url}/dicom-web/studies/1.2.3.4/metadata", timeout=10).status_code == 404
    text = log.read_text()
    assert "1.2.3.4" not in text  # nothing was opened: Orthanc has no such study
    assert ORTHANC_PASSWORD not in text and TOKEN not in text and PASSWORD not in text


def test_wrong_orthanc_credentials_are_a_502_without_a_password_prompt(viewer: Viewer, study: Study) -> None:
    settings = viewer.settings.model_copy(update={"orthanc_password": "not-the-password"})
    client = create_viewer_app(settings).test_client()
    response = client.get("/dicom-web/studies", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "ORTHANC_REFUSED"
    assert "WWW-Authenticate" not in response.headers

    down = viewer.settings.model_copy(update={"orthanc_url": f"http://127.0.0.1:{free_port()}"})
    client = create_viewer_app(down).test_client()
    response = client.get("/dicom-web/studies", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 502 and response.get_json()["error"]["code"] == "ORTHANC_UNAVAILABLE"


class _Recorder(BaseHTTPRequestHandler):
    """An upstream that records what the proxy sends and answers in two parts, the second held back until the
    test releases it: what the client holds before that release came through unbuffered."""

    seen: ClassVar[list[dict[str, str]]] = []
    release = threading.Event()

    def do_GET(self) -> None:
        type(self).seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", "8")
        self.send_header("Content-Range", "bytes 0-7/100")
        self.send_header("Set-Cookie", "orthanc=secret")
        self.send_header("X-Orthanc-Internal", "1")
        self.end_headers()
        self.wfile.write(b"head")
        self.wfile.flush()
        type(self).release.wait(10)
        self.wfile.write(b"tail")

    def log_message(self, *args: object) -> None:
        pass


def test_proxy_streams_passes_only_safe_headers_and_injects_the_credentials(viewer: Viewer) -> None:
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    _Recorder.seen.clear()
    _Recorder.release.clear()
    try:
        settings = viewer.settings.model_copy(
            update={"orthanc_url": f"http://127.0.0.1:{upstream.server_address[1]}"}
        )
        client = create_viewer_app(settings).test_client()
        response = client.get(
            "/dicom-web/studies/1.2/series?includefield=0008103E&limit=5",
            headers={
                "Authorization": f"Bearer {TOKEN}",
                "Cookie": "openmsk_session=abc; tracker=1",
                "Accept": 'multipart/related; type="application/octet-stream"',
                "Range": "bytes=0-7",
                "X-Custom": "not for Orthanc",
            },
            base_url="http://viewer.example.org:8443",
            buffered=False,
        )
        assert response.status_code == 206
        chunks = iter(response.response)
        started = time.monotonic()
        first = next(chunks)
        assert first == b"head" and time.monotonic() - started < 5  # before the upstream finished: streamed
        _Recorder.release.set()
        assert first + b"".join(chunks) == b"headtail"
        response.close()
        assert response.headers["Content-Range"] == "bytes 0-7/100"
        assert "Set-Cookie" not in response.headers and "X-Orthanc-Internal" not in response.headers
    finally:
        _Recorder.release.set()
        upstream.shutdown()
        upstream.server_close()

    (sent,) = _Recorder.seen
    assert sent["path"] == "/dicom-web/studies/1.2/series?includefield=0008103E&limit=5"
    expected = base64.b64encode(f"{ORTHANC_USER}:{ORTHANC_PASSWORD}".encode()).decode()
    assert sent["authorization"] == f"Basic {expected}"  # the node's, never the browser's
    assert "cookie" not in sent and "x-custom" not in sent
    assert sent["accept"] == 'multipart/related; type="application/octet-stream"'
    assert sent["range"] == "bytes=0-7"
    assert sent["forwarded"] == "host=viewer.example.org:8443;proto=http"


# ------------------------------------------------------------------------------------------------ links


def test_links_to_a_study(settings: Settings) -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    local = settings.model_copy(update={"viewer_port": 3000})
    assert study_link(local, uid) == f"http://127.0.0.1:3000/viewer?StudyInstanceUIDs={uid}"
    assert (
        study_link(local, uid, "knee-node.lan:8000")
        == f"http://knee-node.lan:3000/viewer?StudyInstanceUIDs={uid}"
    )
    assert study_link(local, uid, "[::1]:8000").startswith("http://[::1]:3000/viewer?")
    public = load_settings(viewer_url="https://node.example.org:8443/")
    assert (
        study_link(public, uid, "ignored:8000")
        == f"https://node.example.org:8443/viewer?StudyInstanceUIDs={uid}"
    )


def test_job_page_and_web_redirect_lead_to_the_viewer(viewer: Viewer, study: Study) -> None:
    settings = viewer.settings
    store = JobStore.from_url(str(settings.redis_url))
    job = Job(
        source="scp",
        model=MODEL,
        input_path="incoming/a/b",
        destinations=["orthanc"],
        study_uid=study.study_uid,
        series_uid=study.mr_series_uid,
    )
    store.create(job)
    for state in (JobState.QUEUED, JobState.RUNNING):
        store.transition(job.id, state)
    store.transition(
        job.id,
        JobState.DELIVERING,
        lambda j: j.deliveries.__setitem__("orthanc", Delivery(status="done", attempts=1)),
    )
    store.transition(job.id, JobState.DONE)

    web = create_app(settings).test_client()
    origin = "http://127.0.0.1:8000"  # the web pages' own address: the link keeps its host name
    page = web.get("/login", base_url=origin).get_data(as_text=True)
    credentials = {"user": USER, "password": PASSWORD, "csrf_token": csrf_of(page)}
    assert web.post("/login", data=credentials, base_url=origin).status_code == 302
    page = web.get(f"/jobs/{job.id}", base_url=origin).get_data(as_text=True)
    link = f"http://127.0.0.1:{settings.viewer_port}/viewer?StudyInstanceUIDs={study.study_uid}"
    assert f'id="open-viewer" href="{link}"' in page and "Open in viewer" in page

    moved = web.get(f"/viewer?StudyInstanceUIDs={study.study_uid}", base_url=origin)
    assert moved.status_code == 302 and moved.headers["Location"] == link

    # `openmsk orthanc jobs` prints the same absolute link (no web page here: the web server's address).
    printed = subprocess.run(
        [sys.executable, "-m", "openmsk", "orthanc", "jobs", "--json"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (row,) = [row for row in json.loads(printed.stdout) if row["job"] == job.id]
    assert row["viewer"] == link and row["results_in_orthanc"] == [f"{MODEL} {MODEL_VERSION}"]
    printed = subprocess.run(
        [sys.executable, "-m", "openmsk", "orthanc", "studies", "--json"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (row,) = [row for row in json.loads(printed.stdout) if row["study_uid"] == study.study_uid]
    assert row["viewer"] == link and row["segmented_series"] == 1

    # The link leads, after the viewer's sign-in, to the study.
    browser = requests.Session()
    landing = browser.get(link, timeout=10)
    assert landing.url.startswith(f"{viewer.url}/openmsk/login?next=/viewer")
    target = parse_qs(urlsplit(landing.url).query)["next"][0]
    assert target == f"/viewer?StudyInstanceUIDs={study.study_uid}"
