"""Warm the write and analyse stages once when a worker starts, so its first job runs as fast as the next.

highdicom, pydicom and SciPy pay one-off costs on their first call (imports, the standard's attribute tables,
code paths compiled on first use): about a second on a full-size knee, measured by ``bench/pipeline.py``.
A small phantom's true labels stand in for a segmentation; nothing is kept.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from openmsk.phantom import generate, write_series
from worker.analysis_process import start_analysis, start_region_seg
from worker.dicom.seg import write_seg
from worker.dicom.sr import write_sr
from worker.preview import write_preview
from worker.volume import load_series, read_series


def warm_up_outputs() -> float:
    """Write a SEG, a region SEG, an SR and a preview and run the analysis for a small phantom; return the
    seconds taken."""
    started = time.perf_counter()
    phantom = generate(seed=0, size="small")
    with tempfile.TemporaryDirectory(prefix="openmsk-warmup-") as tmp:
        scratch = Path(tmp)
        written = write_series(phantom, scratch / "series")
        volume = load_series(read_series(written["dicom_dir"]))
        labels = phantom.labels  # on the series' grid (write_seg checks it)
        write_preview(volume.image, labels, volume.affine_lps, scratch / "preview.png")
        seg = write_seg(volume, labels, "warm-up", "0", scratch / "seg.dcm")
        analysis = start_analysis(labels, volume.spacing)  # spawns the helper process
        measurements = analysis.result()
        if analysis.region_map is not None:  # the region SEG is written there: warm it there too
            start_region_seg(
                volume, analysis.region_map, "warm-up", "0", scratch / "seg_regions.dcm"
            ).result()
        write_sr(seg.dataset, volume, measurements, "warm-up", "0", scratch / "sr.dcm")
    return time.perf_counter() - started
