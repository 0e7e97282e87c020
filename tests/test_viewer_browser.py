"""The OHIF viewer in a real browser: Debian's headless Chromium (WebGL2 on SwiftShader, no GPU), driven by
Playwright, against the viewer's server and the test Orthanc. The study gets there the way a scanner's does:
storescu → the node's SCP (which archives the images in Orthanc) → worker (nnU-Net, SEG, SR) → Orthanc.

A radiologist's path: open the study from its link, sign in, see the MR image, load the SEG, read the segment
list (the SEG's tissues, in order, in the node's colours), jump to a segment, see it drawn, hide it. Any page
error, HTTP error or console error outside the allow-list below fails the test. Screenshots of the loaded SEG
are saved under ``test-output/viewer/`` (git-ignored) for a human to look at.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from playwright.sync_api import ConsoleMessage, Locator, Page, expect, sync_playwright

from openmsk.config import REPO_DIR, load_settings
from openmsk.jobs import JobState, JobStore
from openmsk.labels import TISSUES
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.managed.process import free_port
from openmsk.managed.redis import ManagedRedis
from openmsk.phantom import generate, write_series
from tests.processes import openmsk, settings_env, wait_for
from tests.test_viewer_proxy import (
    PASSWORD,
    USER,
    Study,
    Viewer,
    assert_dist_installed,
    delete_study,
    start_viewer,
    stop_viewer,
    viewer_settings,
)

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright never downloads a browser here
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--use-angle=swiftshader",  # WebGL2 in software: cornerstone renders with it, no GPU needed
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
OUTPUT_DIR = REPO_DIR / "test-output" / "viewer"
# Console errors that do not mean the viewer failed. Each entry says why it is harmless; keep this list short.
ALLOWED_CONSOLE_ERRORS: tuple[re.Pattern[str], ...] = (
    # "Failed to load resource: net::ERR_ABORTED": a request the page cancelled itself (OHIF drops prefetches of
    # slices it no longer needs while the SEG loads); every answer that did arrive is checked for its status.
    re.compile(r"net::ERR_ABORTED"),
)
COLOUR_BY_NAME = {t.display_name: t.rgb for t in TISSUES.values()}
COLOUR_TOLERANCE = 24  # RGB distance: far below the gap between any two tissue colours and from any grey
LOAD_TIMEOUT_MS = 60_000  # software WebGL on a shared CPU
VIEWPORT = {"width": 1200, "height": 760}  # smaller is faster: SwiftShader draws every pixel on the CPU


@pytest.fixture
def study(redis_url: str, orthanc_server: ManagedOrthanc, tmp_path: Path) -> Iterator[Study]:
    made = scanner_study(redis_url, orthanc_server, tmp_path)
    yield made
    delete_study(orthanc_server, made)


SCANNER_SEED = 808  # the study a "scanner" sends here: no other test uses it (the proxy tests upload seed 8)


def scanner_study(redis_url: str, orthanc: ManagedOrthanc, tmp_path: Path) -> Study:
    """A phantom series sent by storescu to the node's SCP; returns the study once the job is done."""
    node = load_settings(
        data_dir=tmp_path / "node", redis_url=redis_url, scp_host="127.0.0.1", scp_port=free_port(),
        orthanc_url=orthanc.url, orthanc_user=orthanc.user, orthanc_password=orthanc.password,
        orthanc_dicom_port=orthanc.dicom_port, orthanc_aet=orthanc.aet, series_quiet_s=0.5,
        min_free_disk_mb=0, device="cpu",
    )  # fmt: skip
    files = write_series(generate(seed=SCANNER_SEED, size="small"), tmp_path / "phantom")["dicom_files"]
    env = settings_env(node)
    processes = [openmsk(name, env, tmp_path / f"{name}.log") for name in ("scp", "worker")]
    store = JobStore.from_url(redis_url)
    try:
        wait_for(lambda: _listening(node.scp_port), 30, "SCP listening")
        subprocess.run(
            ["storescu", "-aet", "SCANNER1", "-aec", node.scp_ae_title, "127.0.0.1", str(node.scp_port),
             *map(str, files)],
            check=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, timeout=60,
        )  # fmt: skip
        wait_for(lambda: store.count() == 1, 30, "the SCP queued the job")
        job_id = store.list()[0].id
        wait_for(lambda: store.get(job_id).terminal, 240, "the job finished")
        job = store.get(job_id)
        assert job.state is JobState.DONE, job.error
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)
    auth = (orthanc.user, orthanc.password)
    found = requests.post(
        f"{orthanc.url}/tools/find",
        json={"Level": "Instance", "Query": {"StudyInstanceUID": job.study_uid, "Modality": "SEG"}},
        auth=auth,
        timeout=10,
    ).json()
    segs = {
        instance: pydicom.dcmread(
            io.BytesIO(
                requests.get(f"{orthanc.url}/instances/{instance}/file", auth=auth, timeout=30).content
            )
        )
        for instance in found
    }
    # Two SEGs in the study: the tissues (drawn below) and the cartilage subregions.
    assert sorted(str(ds.ContentLabel) for ds in segs.values()) == ["KNEE_REGIONS", "KNEE_SEG"], found
    tissue_id, seg = next((i, ds) for i, ds in segs.items() if ds.ContentLabel == "KNEE_SEG")
    study_id = requests.get(f"{orthanc.url}/instances/{tissue_id}/study", auth=auth, timeout=10).json()["ID"]
    return Study(
        study_uid=job.study_uid,
        mr_series_uid=job.series_uid,
        seg=seg,
        segments=[str(item.SegmentLabel) for item in seg.SegmentSequence],
        orthanc_id=study_id,
    )


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def viewer(redis_server: ManagedRedis, orthanc_server: ManagedOrthanc, tmp_path: Path) -> Iterator[Viewer]:
    running = start_viewer(
        viewer_settings(tmp_path, redis_server.url, orthanc_server), tmp_path / "viewer.log"
    )
    yield running
    stop_viewer(running)


def dismiss_overlays(page: Page) -> None:
    """Close OHIF's onboarding tour and its investigational-use banner, whichever are showing."""
    for control in (
        page.get_by_text("Skip all", exact=True),
        page.get_by_role("button", name="Confirm and hide"),
    ):
        if control.count() and control.first.is_visible():
            control.first.click()
            expect(control).to_have_count(0, timeout=5_000)


def open_study_signed_in(page: Page, viewer_url: str, study_uid: str) -> None:
    """Open the viewer link the job page prints: the node's sign-in comes first, then the study."""
    page.goto(f"{viewer_url}/viewer?StudyInstanceUIDs={study_uid}")
    expect(page).to_have_url(re.compile(r"/openmsk/login\?next="))
    page.fill('input[name="user"]', USER)
    page.fill('input[name="password"]', PASSWORD)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(re.compile(r"/viewer\?StudyInstanceUIDs="))


def away_from_the_panels(page: Page) -> None:
    """Move the mouse off the segment list: a row under the pointer opens a card (with the segment's colour)
    over the viewport."""
    page.mouse.move(5, VIEWPORT["height"] - 5)  # the empty bottom of the study list
    page.wait_for_timeout(300)


def pane_image(pane: Locator) -> np.ndarray:
    """A screenshot of ``pane`` as an (h, w, 3) array."""
    png = pane.screenshot(animations="disabled", caret="hide")
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)


def colour_pixels(image: np.ndarray, rgb: tuple[int, int, int]) -> int:
    """How many pixels of ``image`` have (nearly) the colour ``rgb``."""
    return int((np.sqrt(((image - np.array(rgb)) ** 2).sum(axis=-1)) <= COLOUR_TOLERANCE).sum())


def wait_for_image(
    pane: Locator, check: Callable[[np.ndarray], bool], what: str, timeout_s: float = 20
) -> np.ndarray:
    """Screenshots of ``pane`` until one passes ``check`` (the viewer draws asynchronously); that one."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        image = pane_image(pane)
        if check(image):
            return image
        time.sleep(0.2)
    raise AssertionError(f"not seen within {timeout_s} s: {what}")


def middle(image: np.ndarray) -> np.ndarray:
    """The middle quarter of a viewport: image pixels only, away from the overlay texts in its corners."""
    h, w = image.shape[:2]
    return image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]


def save(image: np.ndarray, name: str) -> None:
    Image.fromarray(image.astype(np.uint8)).save(OUTPUT_DIR / name)


def test_viewer_shows_the_study_and_the_nodes_seg(viewer: Viewer, study: Study) -> None:
    assert_dist_installed()
    assert CHROMIUM.exists(), "install Debian's chromium: apt-get install --no-install-recommends chromium"
    shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
    OUTPUT_DIR.mkdir(parents=True)
    slices = len(study.seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence)
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and not any(p.search(message.text) for p in ALLOWED_CONSOLE_ERRORS):
            problems.append(f"console error: {message.text}")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", on_console)
            page.on(
                "response",
                lambda response: (
                    problems.append(f"HTTP {response.status} {response.url}")
                    if response.status >= 400
                    else None
                ),
            )

            # The link the job page and `openmsk orthanc jobs` print; the viewer asks for the node's sign-in.
            open_study_signed_in(page, viewer.url, study.study_uid)

            # The MR image: a canvas in the viewport and the slice overlay (image n of all slices).
            pane = page.locator('[data-cy="viewport-pane"]').first
            overlay = page.locator('[data-cy="viewport-overlay-bottom-right"]').first
            expect(overlay).to_contain_text(re.compile(rf"\(\d+/{slices}\)"), timeout=LOAD_TIMEOUT_MS)
            expect(pane.locator("canvas").first).to_be_visible()
            dismiss_overlays(page)
            wait_for_image(pane, lambda image: middle(image).std() > 10, "an MR image (not a blank canvas)")

            # The SEGs: thumbnails without image (beside the SR's), named as the node names them; the
            # tissues' one is opened (the other holds the cartilage subregions).
            segs = page.locator('[data-cy="study-browser-thumbnail-no-image"]').filter(has_text="SEG")
            expect(segs).to_have_count(2, timeout=LOAD_TIMEOUT_MS)
            thumbnail = segs.filter(has_text=str(study.seg.SeriesDescription))
            expect(thumbnail).to_have_count(1)
            dismiss_overlays(page)
            thumbnail.dblclick()
            page.locator('[data-cy="yes-hydrate-btn"]').click(timeout=LOAD_TIMEOUT_MS)

            rows = page.locator('[data-cy="data-row"]')
            titles = page.locator('[data-cy="data-row-title"]')
            if not page.get_by_role("heading", name="Segmentations").is_visible():
                page.locator('[data-cy="panelSegmentation-btn"]').click()  # the right panel starts collapsed
            expect(titles).to_have_count(len(study.segments), timeout=LOAD_TIMEOUT_MS)
            assert titles.all_inner_texts() == study.segments
            shown = page.locator('[data-cy="data-row-colorhex"]').evaluate_all(
                "spans => spans.map(s => getComputedStyle(s).backgroundColor)"
            )
            colours = [tuple(int(c) for c in re.findall(r"\d+", value)[:3]) for value in shown]
            for name, colour in zip(study.segments, colours, strict=True):
                expected = COLOUR_BY_NAME[name]
                assert max(abs(a - b) for a, b in zip(colour, expected, strict=True)) <= 2, (name, colour)
            dismiss_overlays(page)
            page.screenshot(path=str(OUTPUT_DIR / "seg-loaded.png"))

            # Jump to the last segment (not the one OHIF shows first), see its colour, hide it, see it gone.
            target = len(study.segments) - 1
            name, rgb = study.segments[target], COLOUR_BY_NAME[study.segments[target]]
            rows.nth(target).click()
            away_from_the_panels(page)
            shown = wait_for_image(
                pane, lambda image: colour_pixels(image, rgb) >= 20, f"{name} drawn in {rgb}"
            )
            save(shown, "segment-shown.png")
            rows.nth(target).locator('[data-cy="data-row-visibility-toggle"]').click()
            away_from_the_panels(page)
            drawn = colour_pixels(shown, rgb)
            hidden = wait_for_image(
                pane, lambda image: colour_pixels(image, rgb) <= drawn // 20, f"{name} hidden"
            )
            save(hidden, "segment-hidden.png")
        finally:
            browser.close()

    assert problems == [], "\n".join(problems)
    for shot in ("seg-loaded.png", "segment-shown.png", "segment-hidden.png"):
        assert (OUTPUT_DIR / shot).stat().st_size > 10_000, shot
