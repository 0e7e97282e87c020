"""What the region outputs add to a job on a full-size knee, side by side with the tissue SEG they follow.

Baseline named for the ratios: the tissue SEG of the same knee (``write_seg``, BINARY), written in the same run.
The region SEG (BINARY and LABELMAP), the thickness maps (PNG) and their Secondary Captures are timed on the
phantom's truth labels and the analysis' region map; each is run ``--repeat`` times and the median printed,
with its ratio to the tissue SEG (ratios hold better than seconds on a shared machine).

    .venv/bin/python bench/region_outputs.py [--size full] [--orientation sagittal] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openmsk.phantom import generate, write_series
from worker.analysis_process import start_analysis
from worker.dicom.sc import write_thickness_sc
from worker.dicom.seg import write_seg
from worker.thickness_maps import thickness_maps, write_thickness_maps
from worker.volume import load_series, read_series


def _median_s(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="full")
    parser.add_argument("--orientation", default="sagittal")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    ph = generate(seed=3, size=args.size, orientation=args.orientation, laterality="R")
    with tempfile.TemporaryDirectory(prefix="openmsk-bench-regions-") as tmp:
        out = Path(tmp)
        volume = load_series(read_series(write_series(ph, out / "phantom")["dicom_dir"]))
        labels = np.asfortranarray(ph.labels)
        analysis = start_analysis(labels, volume.spacing)
        analysis.result()
        region_map = analysis.region_map
        if region_map is None:
            raise SystemExit("the analysis found no knee frame: no region map to write")
        maps = thickness_maps(labels, volume.affine_lps)
        rows = {
            "tissue SEG (baseline)": lambda: write_seg(volume, labels, "bench", "1", out / "seg.dcm"),
            "region SEG, BINARY": lambda: write_seg(
                volume, region_map, "bench", "1", out / "rseg.dcm", regions=True
            ),
            "region SEG, LABELMAP": lambda: write_seg(
                volume, region_map, "bench", "1", out / "rsegl.dcm", regions=True, labelmap=True
            ),
            "thickness maps (PNG)": lambda: write_thickness_maps(labels, volume.affine_lps, out / "maps"),
            "thickness SCs": lambda: write_thickness_sc(volume, maps, "bench", "1", out / "maps"),
        }
        print(f"phantom {args.size} {args.orientation} {ph.labels.shape}, median of {args.repeat}")
        baseline = None
        for name, run in rows.items():
            seconds = _median_s(run, args.repeat)
            baseline = baseline or seconds
            print(f"  {name:24s} {seconds:6.2f} s   x{seconds / baseline:5.2f} of the tissue SEG")


if __name__ == "__main__":
    main()
