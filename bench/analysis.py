"""Knee analysis on a full-size phantom: time against the seed pipeline's mesh-based baseline, and accuracy.

    .venv/bin/python bench/analysis.py [--seed 3] [--orientation oblique] [--laterality L] [--repeat 3] [--seg]
    .venv/bin/python bench/analysis.py --regions      # every plane, both knees: subregion Dice and thickness
    .venv/bin/python bench/analysis.py --follow-up    # 0.3 mm thinner medial weight-bearing femur
    .venv/bin/python bench/analysis.py --model        # the same through the default model's segmentation
    .venv/bin/python bench/analysis.py --model --regions   # through the model, every plane, both knees
    .venv/bin/python bench/analysis.py --model --regions --cases axial:R:16,sagittal:L:16  # other knees

Generates a full-size phantom (384 × 384 × 160 at 0.36 × 0.36 × 0.7 mm), runs ``worker.analysis.analyse`` on
its labels ``--repeat`` times and prints the best and median wall time of the whole analysis (tissues and
cartilage subregions) against its 3 s budget and the 3.5 min (210 s) of the seed pipeline's mesh-based
thickness, the subregion step's share, and each cartilage's and subregion's thickness error against the
phantom's truth. With ``--seg`` it also writes the BINARY and LABELMAP SEG and the SR of the same labels and
prints their time and size (the first SEG write of a process pays highdicom's one-time set-up, so it is done
once untimed). ``--regions`` repeats the subregion check on eight phantoms (four planes × two knees),
``--follow-up`` on a follow-up with one region thinned, ``--model`` on the default model's segmentation of
the phantom (CPU inference: minutes).
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

import numpy as np

from openmsk.labels import CARTILAGES
from openmsk.phantom import LATERALITIES, ORIENTATIONS, Phantom, generate, write_series
from openmsk.regions import REGIONS, REGIONS_BY_NAME
from worker.analysis import analyse, analyse_with_regions

BASELINE_S = 3.5 * 60  # the seed pipeline's mesh-based thickness on the same size of knee
BUDGET_S = 3.0  # the whole analysis (tissues + subregions) on a full-size knee, one core
FOLLOW_UP = ("femoral_medial_central", 0.3)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))


def _region_table(
    phantom: Phantom, measurements: dict[str, Any], region_map: np.ndarray | None
) -> list[float]:
    """Print per subregion: Dice vs the phantom's subregions, truth and measured thickness; return |errors|."""
    print(
        f"  {'subregion':26s} {'dice':>5s} {'truth':>6s} {'mean':>6s} {'err':>7s} {'median':>6s} {'err':>7s}"
    )
    errors = []
    for label, region in REGIONS.items():
        entry = measurements["regions"][region.name]
        truth = phantom.truth["regions"][region.name]["thickness_mm"]
        dice = float("nan")
        if region_map is not None and phantom.regions is not None:
            dice = _dice(region_map == label, phantom.regions == label)
        th = entry["thickness_mm"]
        if th is None:
            print(f"  {region.name:26s} {dice:5.3f} {truth:6.2f}  not measurable: {entry['reason']}")
            continue
        errors.append(abs(th["mean"] / truth - 1))
        print(
            f"  {region.name:26s} {dice:5.3f} {truth:6.2f} {th['mean']:6.3f} {100 * (th['mean'] / truth - 1):+6.1f}% "
            f"{th['median']:6.3f} {100 * (th['median'] / truth - 1):+6.1f}%"
        )
    if errors:
        print(
            f"  median |error| over subregions {100 * float(np.median(errors)):.1f} %, worst {100 * max(errors):.1f} %"
        )
    return errors


def _all_regions(seed: int) -> None:
    """Subregion Dice and thickness on full-size phantoms in every plane, both knees."""
    worst_dice, worst_error = 1.0, 0.0
    for orientation in ORIENTATIONS:
        for laterality in LATERALITIES:
            phantom = generate(seed=seed, size="full", orientation=orientation, laterality=laterality)
            start = time.perf_counter()
            measurements, region_map = analyse_with_regions(phantom.labels, phantom.spacing)
            print(f"{orientation} {laterality}: analysis {time.perf_counter() - start:.2f} s")
            errors = _region_table(phantom, measurements, region_map)
            worst_error = max([worst_error, *errors])
            for label in REGIONS:
                worst_dice = min(worst_dice, _dice(region_map == label, phantom.regions == label))
    print(
        f"over all: lowest subregion Dice {worst_dice:.3f} (needs >= 0.90), worst |error| {100 * worst_error:.1f} %"
    )


def _follow_up(seed: int, orientation: str, laterality: str) -> None:
    """Change per subregion between a baseline and a follow-up with one region thinned."""
    name, mm = FOLLOW_UP
    base = generate(seed=seed, size="full", orientation=orientation, laterality=laterality)
    follow = generate(seed, "full", orientation, laterality, thinning={name: mm})
    m0, m1 = analyse(base.labels, base.spacing), analyse(follow.labels, follow.spacing)
    print(f"follow-up: {name} thinned by {mm} mm ({orientation} {laterality})")
    for region in REGIONS_BY_NAME:
        change = m1["regions"][region]["thickness_mm"]["mean"] - m0["regions"][region]["thickness_mm"]["mean"]
        truth = (
            follow.truth["regions"][region]["thickness_mm"] - base.truth["regions"][region]["thickness_mm"]
        )
        print(
            f"  {region:26s} truth {truth:+.3f} mm  measured {change:+.3f} mm  error {change - truth:+.3f} mm"
        )


def _through_model(phantom: Phantom) -> list[str]:
    """The subregion measurements on the default model's segmentation of *phantom* (what a user gets), with
    and without ``refine_cartilage``; returns one summary line for each."""
    from openmsk.config import REPO_DIR
    from openmsk.models.registry import load_registry
    from worker.models.segmenter import from_canonical, load_segmenter, to_canonical

    entry = load_registry(REPO_DIR / "models" / "registry.toml").default
    segmenter = load_segmenter(entry, "cpu")
    start = time.perf_counter()
    canonical = to_canonical(phantom.image, phantom.affine_lps)
    model_labels = segmenter.predict(canonical.image, canonical.spacing)
    print(f"default model {entry.name} {entry.version}: segmented in {time.perf_counter() - start:.0f} s")
    # the registry's steps, and the same with/without the image-aware cartilage refinement
    base = tuple(step for step in entry.postprocess if step != "refine_cartilage")
    summaries = []
    for steps in (base, (*base, "refine_cartilage")):
        start = time.perf_counter()
        canonical_labels = segmenter.canonical_labels(model_labels, canonical.image, canonical.spacing, steps)
        elapsed = time.perf_counter() - start
        labels = from_canonical(canonical_labels, canonical)
        print(f"postprocess {' + '.join(steps)}: {elapsed:.2f} s")
        for tissue in CARTILAGES:
            print(
                f"  {tissue.name:26s} Dice {_dice(labels == tissue.label, phantom.labels == tissue.label):.3f}"
            )
        start = time.perf_counter()
        measurements, region_map = analyse_with_regions(labels, phantom.spacing)
        print(f"analysis of its segmentation: {time.perf_counter() - start:.2f} s")
        errors = _region_table(phantom, measurements, region_map)
        summaries.append(_summary(phantom, labels, region_map, errors, steps, elapsed))
    return summaries


def _summary(
    phantom: Phantom,
    labels: np.ndarray,
    region_map: np.ndarray | None,
    errors: list[float],
    steps: tuple[str, ...],
    elapsed: float,
) -> str:
    """One line: thickness errors, the lowest region Dice, and region agreement where the tissue is right."""
    case = f"{phantom.truth['orientation']} {phantom.truth['laterality']}"
    refined = "refined" if "refine_cartilage" in steps else "model  "
    line = f"{case:11s} {refined} postprocess {elapsed:4.2f} s"
    if errors:
        line += (
            f"  thickness |error| median {100 * np.median(errors):4.1f} %, worst {100 * max(errors):4.1f} %"
        )
    if region_map is not None and phantom.regions is not None:
        dices = [_dice(region_map == label, phantom.regions == label) for label in REGIONS]
        # the frame's share: regions on voxels whose tissue the model got right (Dice counts both)
        right = (region_map > 0) & (phantom.regions > 0) & (labels == phantom.labels)
        agree = float((region_map[right] == phantom.regions[right]).mean()) if right.any() else float("nan")
        line += f"  region Dice min {min(dices):.3f}, same region where the tissue is right {agree:.3f}"
    return line


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
    parser.add_argument("--laterality", default="R", choices=LATERALITIES)
    parser.add_argument("--seg", action="store_true", help="also time the SEG and SR writers")
    parser.add_argument("--regions", action="store_true", help="subregions in every plane, both knees")
    parser.add_argument("--follow-up", action="store_true", help="change per subregion after thinning")
    parser.add_argument("--model", action="store_true", help="also through the default model's labels")
    parser.add_argument(
        "--cases",
        help="with --model --regions: orientation:laterality:seed,... instead of every plane and knee",
    )
    args = parser.parse_args()
    if args.regions and args.model:
        cases = [(o, lat, args.seed) for o in ORIENTATIONS for lat in LATERALITIES]
        if args.cases:
            cases = [(o, lat, int(seed)) for o, lat, seed in (c.split(":") for c in args.cases.split(","))]
        summaries = []
        for orientation, laterality, seed in cases:
            phantom = generate(seed=seed, size="full", orientation=orientation, laterality=laterality)
            print(f"\n== {orientation} {laterality} seed {seed}")
            summaries += [f"seed {seed:3d} {line}" for line in _through_model(phantom)]
        print("\nthrough the default model, full size:")
        print("\n".join(f"  {line}" for line in summaries))
        return
    if args.regions:
        _all_regions(args.seed)
        return
    if args.follow_up:
        _follow_up(args.seed, args.orientation, args.laterality)
        return

    start = time.perf_counter()
    phantom = generate(seed=args.seed, size="full", orientation=args.orientation, laterality=args.laterality)
    print(
        f"phantom seed {args.seed} {args.orientation} {args.laterality} full {phantom.labels.shape}: "
        f"{time.perf_counter() - start:.1f} s to generate"
    )

    from scipy import ndimage as ndi

    from worker.subregions import assign_regions

    # The worker hands the analysis Fortran-ordered labels (its slice layout): time that layout.
    labels = np.asfortranarray(phantom.labels)
    times, region_times = [], []
    measurements: dict[str, Any] = {}
    region_map = None
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        measurements, region_map = analyse_with_regions(labels, phantom.spacing)
        times.append(time.perf_counter() - start)
        boxes = [None if b is None else b[::-1] for b in ndi.find_objects(labels.T)]
        start = time.perf_counter()
        assign_regions(labels, phantom.spacing, boxes)
        region_times.append(time.perf_counter() - start)
    best, median = min(times), statistics.median(times)
    print(f"analyse (tissues + subregions): best {best:.2f} s, median {median:.2f} s over {len(times)} runs")
    print(f"  of which the subregion frame and assignment: median {statistics.median(region_times):.3f} s")
    print(f"ratio to the {BUDGET_S:.0f} s budget: {median / BUDGET_S:.2f}")
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
    _region_table(phantom, measurements, region_map)
    if args.seg:
        _seg_and_sr(phantom, measurements)
    if args.model:
        _through_model(phantom)


if __name__ == "__main__":
    main()
