"""Knee analysis on a full-size phantom: time against the seed pipeline's mesh-based baseline, and accuracy.

    .venv/bin/python bench/analysis.py [--seed 3] [--orientation oblique] [--repeat 3] [--seg]

Generates a full-size phantom (384 × 384 × 160 at 0.36 × 0.36 × 0.7 mm), runs ``worker.analysis.analyse`` on
its labels ``--repeat`` times and prints the best and median wall time, their ratio to the 3.5 min (210 s) of
the seed pipeline's mesh-based thickness, and each cartilage's thickness error against the phantom's truth.
With ``--seg`` it also writes the BINARY and LABELMAP SEG and the SR of the same labels and prints their time
and size (the first SEG write of a process pays highdicom's one-time set-up, so it is done once untimed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openmsk.labels import CARTILAGES
from openmsk.phantom import ORIENTATIONS, Phantom, generate, write_series
from worker.analysis import analyse

BASELINE_S = 3.5 * 60  # the seed pipeline's mesh-based thickness on the same size of knee


def _seg_and_sr(phantom: Phantom, measurements: dict[str, Any]) -> None:
    from worker.dicom.seg import write_seg
    from worker.dicom.sr import write_sr
    from worker.volume import load_series, read_series

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = write_series(phantom, out / "in")
        volume = load_series(read_series(files["dicom_dir"]))
        write_seg(volume, phantom.labels, "bench", "0", out / "warm.dcm")  # one-time set-up of highdicom
        for labelmap in (False, True):
            start = time.perf_counter()
            seg = write_seg(volume, phantom.labels, "bench", "1", out / "seg.dcm", labelmap=labelmap)
            elapsed = time.perf_counter() - start
            size = seg.path.stat().st_size / 1e6 if seg.path else float("nan")
            kind = "LABELMAP" if labelmap else "BINARY"
            print(f"SEG {kind:8s}  {elapsed:5.2f} s  {size:5.1f} MB  {len(seg.segments)} segments")
        start = time.perf_counter()
        seg = write_seg(volume, phantom.labels, "bench", "1", out / "seg.dcm")
        write_sr(seg.path, volume, measurements, "bench", "1", out / "sr.dcm")
        print(f"SR (after a BINARY SEG)  {time.perf_counter() - start:5.2f} s for SEG + SR")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--orientation", default="oblique", choices=ORIENTATIONS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seg", action="store_true", help="also time the SEG and SR writers")
    args = parser.parse_args()

    start = time.perf_counter()
    phantom = generate(seed=args.seed, size="full", orientation=args.orientation)
    print(
        f"phantom seed {args.seed} {args.orientation} full {phantom.labels.shape}: "
        f"{time.perf_counter() - start:.1f} s to generate"
    )

    times = []
    measurements: dict[str, Any] = {}
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        measurements = analyse(phantom.labels, phantom.spacing)
        times.append(time.perf_counter() - start)
    best, median = min(times), statistics.median(times)
    print(f"analyse: best {best:.2f} s, median {median:.2f} s over {len(times)} runs")
    print(
        f"ratio to the mesh-based baseline ({BASELINE_S:.0f} s): {median / BASELINE_S:.4f} "
        f"({BASELINE_S / median:.0f}× faster)"
    )

    print(
        f"{'cartilage':26s} {'truth':>6s} {'mean':>6s} {'err':>7s} {'median':>6s} {'err':>7s} {'p95':>6s} "
        f"{'vx':>5s}"
    )
    for tissue in CARTILAGES:
        truth = phantom.truth["cartilage_thickness_mm"][tissue.name]
        th = measurements["tissues"][tissue.name]["thickness_mm"]
        print(
            f"{tissue.name:26s} {truth:6.2f} {th['mean']:6.3f} {100 * (th['mean'] / truth - 1):+6.1f}% "
            f"{th['median']:6.3f} {100 * (th['median'] / truth - 1):+6.1f}% {th['p95']:6.2f} "
            f"{th['voxels_across']:5.1f}"
        )
    if args.seg:
        _seg_and_sr(phantom, measurements)


if __name__ == "__main__":
    main()
