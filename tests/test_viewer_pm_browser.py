"""The T2 parametric map in OHIF, in headless Chromium (issue 14): the viewer lists the map and draws it in
colour over the images with its parametric-map extension.

OHIF 3.13 (node_modules/@ohif/app/dist) bundles ``@ohif/extension-cornerstone-dicom-pmap``: its SOP class
handler takes Parametric Map Storage (1.2.840.10008.5.1.4.1.1.30), lists it as a PMAP series and opens it in
a fusion viewport over the series its ReferencedSeriesSequence names first. Its dcmjs adapter expects one
image in that series per map frame and fills the overlay frame by frame from the lowest slice (it ignores the
frames' positions). Over the qDESS series itself (two echoes per position) it threw ``RangeError: Invalid
typed array length``; so the node writes the image it segmented as a derived one-echo series
(``worker.dicom.mr``), references it first and orders the map's frames from the lowest slice. This test proves
the result: the map and its base series are listed under the node's descriptions and series numbers, the
extension's viewport loads the map without an error and draws it in colour over the image.

The study goes straight into Orthanc (REST), no worker: a qDESS phantom and the outputs of the worker's T2
stage (``run_t2``) on the phantom's labels. Screenshots go to ``test-output/viewer-pm/`` (git-ignored).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from playwright.sync_api import ConsoleMessage, expect, sync_playwright

from openmsk.config import REPO_DIR
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.managed.redis import ManagedRedis
from openmsk.phantom.echoes import generate_echoes, write_echo_series
from tests.test_viewer_browser import (
    ALLOWED_CONSOLE_ERRORS,
    CHROMIUM,
    CHROMIUM_FLAGS,
    LOAD_TIMEOUT_MS,
    VIEWPORT,
    away_from_the_panels,
    dismiss_overlays,
    middle,
    open_study_signed_in,
    pane_image,
    wait_for_image,
)
from tests.test_viewer_proxy import (
    Viewer,
    assert_dist_installed,
    start_viewer,
    stop_viewer,
    viewer_settings,
)
from worker.inputs import load_input
from worker.t2 import MultiEchoVolume
from worker.t2.stage import run_t2

PHANTOM_SEED = 1414  # no other test uses it: this study is ours alone in the shared Orthanc
OUTPUT_DIR = REPO_DIR / "test-output" / "viewer-pm"


@pytest.fixture
def pm_study(
    orthanc_server: ManagedOrthanc, tmp_path: Path
) -> Iterator[tuple[str, pydicom.Dataset, pydicom.Dataset]]:
    phantom = generate_echoes("qdess", seed=PHANTOM_SEED, snr=40.0)
    paths = write_echo_series(phantom, tmp_path / "phantom")
    volume = load_input(paths["dicom_dir"])
    assert isinstance(volume, MultiEchoVolume)
    t2 = run_t2(volume, phantom.base.labels, {}, "demo", "1.0", tmp_path / "outputs")
    assert t2.warning is None and len(t2.dicom) == volume.image.shape[2] + 1  # the base series and the map
    auth = (orthanc_server.user, orthanc_server.password)
    with requests.Session() as session:
        for path in [*paths["dicom_files"], *(item[0] for item in t2.dicom)]:
            answer = session.post(
                f"{orthanc_server.url}/instances", data=path.read_bytes(), auth=auth, timeout=30
            )
            answer.raise_for_status()
    study_id = answer.json()["ParentStudy"]
    pm, base = (pydicom.dcmread(t2.dicom[i][0], stop_before_pixels=True) for i in (-1, 0))
    yield volume.study_uid, pm, base
    requests.delete(f"{orthanc_server.url}/studies/{study_id}", auth=auth, timeout=30)


@pytest.fixture
def viewer(redis_server: ManagedRedis, orthanc_server: ManagedOrthanc, tmp_path: Path) -> Iterator[Viewer]:
    running = start_viewer(
        viewer_settings(tmp_path, redis_server.url, orthanc_server), tmp_path / "viewer.log"
    )
    yield running
    stop_viewer(running)


def saturated_pixels(image: np.ndarray) -> int:
    """Pixels in clear colour (a grey MR image has none): the map's colour overlay."""
    rgb = image[..., :3].astype(int)
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 80).sum())


def test_viewer_draws_the_t2_map_over_its_base_series(
    viewer: Viewer, pm_study: tuple[str, pydicom.Dataset, pydicom.Dataset]
) -> None:
    assert_dist_installed()
    assert CHROMIUM.exists(), "install Debian's chromium: apt-get install --no-install-recommends chromium"
    study_uid, pm, base = pm_study
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == base.SeriesInstanceUID
    shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
    OUTPUT_DIR.mkdir(parents=True)
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
                lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None,
            )
            open_study_signed_in(page, viewer.url, study_uid)

            pane = page.locator('[data-cy="viewport-pane"]').first
            overlay = page.locator('[data-cy="viewport-overlay-bottom-right"]').first
            expect(overlay).to_contain_text(re.compile(r"\(\d+/\d+\)"), timeout=LOAD_TIMEOUT_MS)
            dismiss_overlays(page)
            wait_for_image(pane, lambda image: middle(image).std() > 10, "an MR image")

            # The map and the series it is drawn over, under the descriptions the node gives them.
            thumbnails = page.locator('[data-cy^="study-browser-thumbnail"]')
            thumbnail = thumbnails.filter(has_text=str(pm.SeriesDescription))
            expect(thumbnail).to_have_count(1, timeout=LOAD_TIMEOUT_MS)
            expect(thumbnail).to_contain_text("PMAP")  # the pmap SOP class handler took it
            expect(thumbnail).to_contain_text(f"S:{pm.SeriesNumber}")
            expect(thumbnails.filter(has_text=f"S:{base.SeriesNumber}")).to_have_count(1)
            page.screenshot(path=str(OUTPUT_DIR / "study.png"))
            grey = saturated_pixels(pane_image(pane))
            dismiss_overlays(page)
            thumbnail.dblclick()
            expect(page.get_by_text("Loading Parametric Map")).to_be_visible(timeout=LOAD_TIMEOUT_MS)
            expect(page.get_by_text("Loading Parametric Map")).to_be_hidden(timeout=LOAD_TIMEOUT_MS)
            away_from_the_panels(page)
            drawn = wait_for_image(
                pane,
                lambda image: saturated_pixels(image) > grey + 2000,
                "the T2 map drawn in colour over the image",
                timeout_s=30,
            )
            Image.fromarray(drawn.astype(np.uint8)).save(OUTPUT_DIR / "pm-drawn.png")
            page.screenshot(path=str(OUTPUT_DIR / "pm-opened.png"))
        finally:
            browser.close()
    assert problems == [], "\n".join(problems)
