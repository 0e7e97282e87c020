"""The HTTP sweep: every route of the web app and of the viewer, found in ``app.url_map`` (so a new route fails
here until it is classified), without a token, with a wrong one, cross-site without the CSRF token, with other
methods; then upload fuzz against a real ``openmsk web`` process — nested zip bombs, polyglots, wrong content
types, a streamed 512 MB bomb, slow-loris connections — with the server's memory sampled and a probe asking
it for a page throughout.

What ``tests/test_web_api.py`` already covers (zip-slip, absolute paths, symlinks, ratio and size bombs, too
many entries, truncated zips, oversized and chunked bodies) is not repeated here.
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.routing import Rule

from openmsk import audit
from openmsk.config import Settings, load_settings
from openmsk.managed.process import free_port
from openmsk.managed.redis import ManagedRedis
from openmsk.phantom import generate, write_series
from tests.processes import settings_env, wait_for
from web import create_app
from web.auth import hash_password
from web.viewer import create_viewer_app

TOKEN = "sweep-token-0123456789abcdef"
USER, PASSWORD = "sweeper", "quadriceps-tendon"
MB = 1024 * 1024
JOB_ID = "0" * 32

# The routes anybody may call, by endpoint (and what they answer): monitoring, the sign-in form, the static
# files, and the web app's redirect to the viewer's origin (which asks for the sign-in itself).
WEB_PUBLIC = {
    "static": {200, 404},
    "health.get_health": {200, 503},
    "metrics.get_metrics": {200},
    "pages.login": {200},
    "to_viewer.redirect_to_viewer": {302},
}
VIEWER_PUBLIC = {"static": {200, 404}, "viewer.login": {200}}
# Values for the URL variables of every rule (a well-formed job id, a file name, a path).
URL_VALUES = {
    "job_id": JOB_ID,
    "name": "seg.dcm",
    "filename": "style.css",
    "path": "viewer",
    "rest": "studies",
}


def _settings(root: Path, redis_url: str, **changes: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": root / "data",
        "redis_url": redis_url,
        "web_host": "127.0.0.1",
        "web_port": free_port(),
        "viewer_port": free_port(),
        "api_tokens": [TOKEN],
        "web_users": f"{USER}:{hash_password(PASSWORD)}",
        "secret_key": "sweep-secret-key-0123456789abcdef",
        "min_free_disk_mb": 0,
    }
    values.update(changes)
    return load_settings(**values)


def _url(rule: Rule) -> str:
    return rule.build({name: URL_VALUES[name] for name in rule.arguments}, append_unknown=False)[1]


def _routes(app: Flask) -> Iterator[tuple[Rule, str, str]]:
    """(rule, method, url) of every route and method an app serves (HEAD and OPTIONS come with GET)."""
    for rule in app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield rule, method, _url(rule)


def _signed_in(client: FlaskClient, login: str) -> None:
    page = client.get(login).get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    answer = client.post(login, data={"user": USER, "password": PASSWORD, "csrf_token": csrf})
    assert answer.status_code == 302, answer.get_data(as_text=True)


def test_every_web_route_is_public_by_name_or_needs_a_token_or_a_session(
    settings: Settings, tmp_path: Path
) -> None:
    app = create_app(_settings(tmp_path, str(settings.redis_url)))
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert set(WEB_PUBLIC) <= endpoints
    anonymous = app.test_client()
    checked = 0
    for rule, method, url in _routes(app):
        public = rule.endpoint in WEB_PUBLIC and method == "GET"
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}):
            answer = anonymous.open(url, method=method, headers=headers)
            where = f"{method} {url} {headers}"
            if public:
                assert answer.status_code in WEB_PUBLIC[rule.endpoint], where
            elif rule.endpoint.startswith("api."):
                assert answer.status_code == 401, where
                assert answer.json["error"]["code"] == "UNAUTHORIZED", where
            elif method == "GET":  # a page: to the sign-in form, nothing of the page itself
                assert answer.status_code == 302, where
                assert answer.headers["Location"].startswith("/login?next="), where
            else:  # a form without its CSRF token: refused before anything else
                assert answer.status_code == 403, where
            checked += 1
    assert checked >= 3 * len(endpoints)
    # Dozens of wrong tokens from one address: audited, but as one line a minute, not one per request.
    failures = [
        e
        for e in audit.AuditLog(app.config["OPENMSK_SETTINGS"].data_path).read()
        if e.get("reason") == "wrong-token"
    ]
    assert len(failures) == 1 and failures[0]["participants"] == [{"role": "user", "address": "127.0.0.1"}]

    # Cross-site: the browser sends the session cookie along, but the forged form or script has no CSRF token.
    browser = app.test_client()
    _signed_in(browser, "/login")
    unsafe = [(rule, method, url) for rule, method, url in _routes(app) if method not in ("GET",)]
    assert {rule.endpoint for rule, _, _ in unsafe} == {
        "api.create_job",
        "pages.login",
        "pages.logout",
        "pages.upload_form",
    }
    for _, method, url in unsafe:
        for body in ({"csrf_token": "forged"}, {}):
            answer = browser.open(url, method=method, data=body, headers={"Origin": "https://evil.example"})
            assert answer.status_code == 403, (method, url, body)
            text = answer.get_data(as_text=True)
            assert "CSRF_FAILED" in text if url.startswith("/api/") else "security token" in text
        multipart = browser.open(
            url, method=method, data={"file": (io.BytesIO(b"x"), "a.zip")}, content_type="multipart/form-data"
        )
        assert multipart.status_code == 403, (method, url)
    assert browser.get("/jobs").status_code == 200  # still signed in: the refusals were about the token only

    # Other methods on every route: 405, never the route's action; an override header changes nothing.
    for rule in app.url_map.iter_rules():
        for method in {"PUT", "DELETE", "PATCH"} - set(rule.methods or ()):
            answer = browser.open(_url(rule), method=method, headers={"Authorization": f"Bearer {TOKEN}"})
            assert answer.status_code == 405, (method, rule.rule)
    tampered = anonymous.post("/api/jobs", headers={"X-HTTP-Method-Override": "GET"})
    assert tampered.status_code == 401
    tampered = browser.get(
        "/api/jobs", headers={"X-HTTP-Method-Override": "DELETE", "X-Method-Override": "POST"}
    )
    assert tampered.status_code == 200 and "jobs" in tampered.json  # a plain read


def test_every_viewer_route_needs_the_sign_in(settings: Settings, tmp_path: Path) -> None:
    app = create_viewer_app(_settings(tmp_path, str(settings.redis_url)))
    anonymous = app.test_client()
    for rule, method, url in _routes(app):
        public = rule.endpoint in VIEWER_PUBLIC and method == "GET"
        for headers in ({}, {"Authorization": "Bearer wrong-token"}):
            answer = anonymous.open(url, method=method, headers=headers)
            where = f"{method} {url} {headers}"
            if public:
                assert answer.status_code in VIEWER_PUBLIC[rule.endpoint], where
            elif rule.endpoint == "viewer.proxy":
                assert answer.status_code == 401 and "WWW-Authenticate" not in answer.headers, where
            elif method == "GET":
                assert answer.status_code == 302, where
                assert answer.headers["Location"].startswith("/openmsk/login"), where
            else:
                assert answer.status_code == 403, where
    browser = app.test_client()
    _signed_in(browser, "/openmsk/login")
    for url in ("/openmsk/login", "/openmsk/logout"):
        answer = browser.post(
            url, data={"user": USER, "password": PASSWORD}, headers={"Origin": "https://evil.example"}
        )
        assert answer.status_code == 403, url
    for method in ("PUT", "DELETE", "PATCH", "POST"):
        for url in ("/dicom-web/studies", "/wado?requestType=WADO", "/dicom-web"):
            assert browser.open(url, method=method).status_code == 405, (method, url)


# ------------------------------------------------------------------------------------ a real web process


@dataclass
class Web:
    settings: Settings
    proc: subprocess.Popen
    log: Path
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.settings.web_port}"

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


IDLE_TIMEOUT_S = 2  # the server's idle timeout in this test (60 s in production: web/serving.py)
# `openmsk web` exactly as the node runs it, with only the idle timeout shortened so the test need not wait.
WEB_COMMAND = (
    "import sys, web.serving as serving; "
    f"serving.IDLE_TIMEOUT_S = {IDLE_TIMEOUT_S}; serving.CLEANUP_INTERVAL_S = 0.5; "
    "from openmsk.cli import main; sys.exit(main(['web']))"
)


@pytest.fixture(scope="module")
def web(redis_server: ManagedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    root = tmp_path_factory.mktemp("sweep-web")
    settings = _settings(root, redis_server.url, max_upload_mb=8, max_unzipped_mb=16, upload_rate_limit=100)
    log = root / "web.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WEB_COMMAND],
            env=settings_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = Web(settings, proc, log)
    try:
        wait_for(
            lambda: requests.get(f"{running.url}/login", timeout=5).status_code == 200, 30, "web answering"
        )
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


class Watch(threading.Thread):
    """Samples the server's RSS and times a page request every 50 ms while the fuzz runs."""

    def __init__(self, web: Web) -> None:
        super().__init__(daemon=True)
        self.web, self.stop = web, threading.Event()
        self.peak_mb, self.slowest_s, self.failures, self.probes = 0.0, 0.0, 0, 0

    def finish(self) -> None:
        """Stops after one more whole probe, so a fuzz faster than the interval is still watched at its end."""
        wanted, deadline = max(2, self.probes + 2), time.monotonic() + 15
        while self.probes < wanted and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stop.set()
        self.join(timeout=15)

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_mb = max(self.peak_mb, self.web.rss_mb())
            started = time.monotonic()
            try:
                ok = requests.get(f"{self.web.url}/login", timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            self.failures += not ok
            self.probes += 1
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            self.stop.wait(0.05)


def _zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def _streamed_bomb(megabytes: int) -> bytes:
    """One entry of ``megabytes`` zeros, deflated (about 1000:1), written without holding it in memory."""
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("zeros.dcm", "w", force_zip64=True) as entry,
    ):
        block = bytes(MB)
        for _ in range(megabytes):
            entry.write(block)
    return buffer.getvalue()


def _post(
    web: Web, data: bytes, name: str = "upload.zip", content_type: str = "application/octet-stream"
) -> requests.Response:
    return requests.post(
        f"{web.url}/api/jobs",
        headers={"Authorization": f"Bearer {TOKEN}"},
        files=[("file", (name, data, content_type))],
        timeout=60,
    )


def test_upload_fuzz_is_refused_with_bounded_memory_and_the_server_answering(
    web: Web, tmp_path: Path
) -> None:
    write_series(generate(seed=13, size="small"), tmp_path / "phantom")
    slices = sorted((tmp_path / "phantom" / "dicom").iterdir())
    one = slices[0].read_bytes()
    inner = _zip({"zeros.dcm": bytes(15 * MB)})  # each inner zip alone is under the caps
    cases: dict[str, tuple[bytes, int, str]] = {
        # Zips inside zips are never opened: a nested bomb is a zip with nothing usable in it.
        "nested-bomb": (
            _zip({f"inner{n}.zip": inner for n in range(40)}, zipfile.ZIP_STORED),
            415,
            "INVALID_FORMAT",
        ),
        "nested-bomb-deflated": (
            _zip({f"l1/{n}.zip": _zip({"l2.zip": inner}) for n in range(40)}),
            415,
            "INVALID_FORMAT",
        ),
        "streamed-512mb-bomb": (_streamed_bomb(512), 422, "UNSAFE_ARCHIVE"),
        # A DICOM file with a zip behind it is read as the zip it also is: its unsafe entry is refused.
        "polyglot-dicom-zip-slip": (one + _zip({"../../evil.dcm": one}), 422, "UNSAFE_ARCHIVE"),
        "polyglot-zip-of-junk": (one + _zip({"readme.txt": b"hello"}), 415, "INVALID_FORMAT"),
        "png-named-dcm": (b"\x89PNG\r\n\x1a\n" + bytes(2000), 415, "INVALID_FORMAT"),
        "dicom-preamble-only": (bytes(128) + b"DICM", 415, "INVALID_FORMAT"),
        "gzip-of-junk": (b"\x1f\x8b\x08\x00" + bytes(500), 415, "INVALID_FORMAT"),
    }
    watch = Watch(web)
    baseline = web.rss_mb()
    watch.start()
    try:
        for case, (data, status, code) in cases.items():
            answer = _post(web, data)
            assert answer.status_code == status, (case, answer.text[:300])
            assert answer.json()["error"]["code"] == code, case
            assert "Traceback" not in answer.text
        for content_type in (
            "text/plain",
            "application/zip",
            "application/dicom",
            "application/x-www-form-urlencoded",
        ):
            answer = requests.post(
                f"{web.url}/api/jobs",
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type},
                data=b"PK\x03\x04" + bytes(1000),
                timeout=30,
            )
            assert answer.status_code == 415 and answer.json()["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE", (
                content_type
            )
        no_boundary = requests.post(
            f"{web.url}/api/jobs",
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "multipart/form-data"},
            data=b"--x\r\n" + bytes(1000),
            timeout=30,
        )
        assert no_boundary.status_code == 400
    finally:
        watch.finish()
    print(
        f"RSS {baseline:.0f} MB at rest, peak {watch.peak_mb:.0f} MB during the fuzz; "
        f"{watch.probes} probes, slowest {watch.slowest_s * 1000:.0f} ms"
    )
    assert (
        watch.failures == 0 and watch.probes >= 2
    )  # the probe ran beside the fuzz (few times on a loaded machine), and always got its page
    assert watch.slowest_s < 5.0
    assert (
        watch.peak_mb < baseline + 100
    )  # the 512 MB bomb never reached memory (nor the 16 MB cap's worth twice)
    assert not list(web.settings.data_path.rglob("evil*")) and not list(
        web.settings.data_path.parent.rglob("evil*")
    )
    uploads = web.settings.data_path / "uploads"
    assert not uploads.exists() or not list(uploads.iterdir())


def _slow_upload_head(web: Web, length: int) -> bytes:
    return (
        f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: {length}\r\n\r\n"
        '--XyZ\r\nContent-Disposition: form-data; name="file"; filename="slow.zip"\r\n\r\n'
    ).encode()


def test_slow_loris_holds_no_thread_and_is_cut_off_when_silent(web: Web) -> None:
    # More slow clients than the server has request threads (8): half dribble an upload, half never finish
    # their headers.
    slow: list[socket.socket] = []
    for n in range(24):
        sock = socket.create_connection(("127.0.0.1", web.settings.web_port), timeout=10)
        sock.sendall(_slow_upload_head(web, 10 * MB) if n % 2 else b"GET /api/jobs HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    try:
        deadline = time.monotonic() + IDLE_TIMEOUT_S * 0.8
        while time.monotonic() < deadline:  # dribbling: a byte each, more often than the idle timeout
            for sock in slow:
                sock.sendall(b"X-a: b\r\n" if slow.index(sock) % 2 == 0 else b"\0")
            started = time.monotonic()
            assert requests.get(f"{web.url}/login", timeout=5).status_code == 200
            assert time.monotonic() - started < 2.0  # answered at once: no thread is held by the slow ones
            time.sleep(0.2)
        # Now they go silent: the server closes every one of them after the idle timeout.
        silent_from = time.monotonic()
        closed_at = []
        for sock in slow:
            sock.settimeout(IDLE_TIMEOUT_S + 10)
            try:
                leftover = sock.recv(65536)
            except ConnectionResetError:
                leftover = b""
            except TimeoutError:
                raise AssertionError("a silent connection was left open past the idle timeout") from None
            assert leftover == b"", leftover[:100]  # closed without an answer: it never sent a whole request
            closed_at.append(time.monotonic() - silent_from)
        print(
            f"24 silent connections closed by the server {closed_at[0]:.1f}-{closed_at[-1]:.1f} s after "
            f"they went silent (idle timeout {IDLE_TIMEOUT_S} s)"
        )
        # Open while they dribbled and for most of the timeout after; all closed soon after the timeout.
        assert closed_at[0] > IDLE_TIMEOUT_S * 0.5 and closed_at[-1] < IDLE_TIMEOUT_S + 3
    finally:
        for sock in slow:
            sock.close()
    assert requests.get(f"{web.url}/login", timeout=5).status_code == 200
    uploads = web.settings.data_path / "uploads"
    assert not uploads.exists() or not list(uploads.iterdir())
