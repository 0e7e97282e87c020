"""The pages in a real browser: Debian's headless Chromium, driven by Playwright, against `openmsk web` and
`openmsk worker` processes with the test Redis and Orthanc and the shipped demo model.

A person's whole path: sign in, drop a phantom zip, watch the job's progress reach done, see the preview and
the measurement table, download the SEG. The finished job page is saved as a screenshot under
``test-output/web/`` (git-ignored) for a human to look at.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import pydicom
import pytest
import requests
from playwright.sync_api import Page, expect, sync_playwright

from openmsk.config import REPO_DIR, Settings
from openmsk.jobs import JobState, JobStore
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.phantom import generate, write_series
from tests.conftest import ORTHANC_PASSWORD, ORTHANC_USER
from tests.processes import openmsk, settings_env, wait_for
from tests.test_web_api import start_web, stop_web
from web.auth import hash_password

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright never downloads a browser here
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
OUTPUT_DIR = REPO_DIR / "test-output" / "web"
USER, PASSWORD = "radiographer", "knee-mri-2024"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
JOB_TIMEOUT_MS = 300_000  # the small phantom on a shared CPU


@pytest.fixture
def phantom_zip(tmp_path: Path) -> Path:
    """A zip of a small phantom series, as a person would export it: one folder of extension-less files."""
    folder = tmp_path / "phantom"
    write_series(generate(seed=21, size="small"), folder)
    archive = tmp_path / "knee.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted((folder / "dicom").iterdir()):
            out.write(path, f"EXPORT/SERIES1/{path.stem}")
    return archive


def sign_in(page: Page, base: str) -> None:
    page.goto(f"{base}/")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill('input[name="user"]', USER)
    page.fill('input[name="password"]', PASSWORD)
    page.click("button:has-text('Sign in')")
    expect(page.locator("h1")).to_have_text("Segment a knee MRI")


def test_upload_progress_results_and_seg_download(
    settings: Settings, orthanc_server: ManagedOrthanc, phantom_zip: Path, tmp_path: Path
) -> None:
    assert CHROMIUM.exists(), "install Debian's chromium: apt-get install --no-install-recommends chromium"
    node = settings.model_copy(
        update={
            "orthanc_url": orthanc_server.url,
            "orthanc_user": ORTHANC_USER,
            "orthanc_password": ORTHANC_PASSWORD,
            "orthanc_dicom_port": orthanc_server.dicom_port,  # the web's forwarder archives the upload there
            "orthanc_aet": orthanc_server.aet,
            "web_users": f"{USER}:{hash_password(PASSWORD)}",
            "min_free_disk_mb": 0,
        }
    )
    web = start_web(node, tmp_path / "web.log")
    worker = openmsk("worker", settings_env(node, OPENMSK_DEVICE="cpu"), tmp_path / "worker.log")
    base = f"http://127.0.0.1:{node.web_port}"
    shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
    OUTPUT_DIR.mkdir(parents=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
            context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            errors: list[str] = []
            page.on(
                "console", lambda message: errors.append(message.text) if message.type == "error" else None
            )

            sign_in(page, base)
            default = page.locator("#model option:checked")
            expect(default).to_contain_text("(default)")
            page.set_input_files("#file", str(phantom_zip))
            expect(page.locator("#file-summary")).to_contain_text("knee.zip")
            page.click("#upload-button")

            page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"), timeout=60_000)
            job_id = page.url.rsplit("/", 1)[1]
            expect(page.locator("#stages tbody tr")).to_have_count(7)
            # Live progress: the stage table moves on without a reload, then the page reloads once done.
            expect(page.locator("#stages tr.stage-done").first).to_be_visible(timeout=JOB_TIMEOUT_MS)
            expect(page.locator("#job-state")).to_have_text(re.compile("done|failed"), timeout=JOB_TIMEOUT_MS)
            store = JobStore.from_url(str(node.redis_url))
            job = store.get(job_id)
            assert job.state is JobState.DONE, job.error
            # The uploaded images went to Orthanc as well (before the SEG), so "Open in viewer" has them.
            assert job.archive == ["orthanc"]
            found = requests.post(
                f"{orthanc_server.url}/tools/find",
                json={"Level": "Instance", "Query": {"SeriesInstanceUID": job.series_uid}},
                auth=(ORTHANC_USER, ORTHANC_PASSWORD),
                timeout=10,
            ).json()
            assert len(found) == len(job.sop_uids) > 0
            expect(page.locator("#transfers")).to_contain_text("archived")
            expect(page.locator("#results")).to_be_visible(timeout=30_000)

            preview = page.locator("#preview")
            expect(preview).to_be_visible()
            assert page.eval_on_selector("#preview", "img => img.complete && img.naturalWidth > 0")
            # The table shows every tissue of the job's report.json, in label order, with its volume.
            report = json.loads((node.data_path / f"jobs/{job_id}/output/report.json").read_text())
            tissues = sorted(report["tissues"].values(), key=lambda t: t["label"])
            assert tissues, "the model found no tissue"
            rows = page.locator("#measurements tbody tr").all_inner_texts()
            assert [row.split("\t")[0].strip() for row in rows] == [t["display_name"] for t in tissues]
            assert f"{tissues[0]['volume_mm3']:,.0f}" in rows[0]
            expect(page.locator("#expiry")).to_contain_text("are deleted on")
            link = page.get_by_text("Open the study in Orthanc")
            expect(link).to_be_visible()
            to_orthanc = context.request.get(f"{base}{link.get_attribute('href')}", max_redirects=0)
            assert to_orthanc.status == 302
            assert to_orthanc.headers["location"].startswith(
                f"{orthanc_server.url}/app/explorer.html#study?uuid="
            )
            assert all(state == "done" for state in page.locator("#stages .stage-state").all_inner_texts())

            with page.expect_download() as download:
                page.click("a:has-text('DICOM SEG')")
            seg_path = tmp_path / "seg.dcm"
            download.value.save_as(seg_path)
            seg = pydicom.dcmread(seg_path)
            assert seg.SOPClassUID == SEG_SOP_CLASS and seg.StudyInstanceUID == job.study_uid

            page.screenshot(path=str(OUTPUT_DIR / "job-done.png"), full_page=True)
            page.goto(f"{base}/jobs")
            expect(page.locator("table")).to_contain_text(job_id[:8])
            page.screenshot(path=str(OUTPUT_DIR / "jobs.png"), full_page=True)
            assert errors == [], errors  # no script errors, no CSP violations
            browser.close()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        stop_web(web)
    wait_for(lambda: (OUTPUT_DIR / "job-done.png").stat().st_size > 10_000, 5, "the screenshot")
