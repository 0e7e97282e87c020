"""Cartilage thickness per subregion: the node's analysis side by side with pymskt, the seed's library.

    python bench/thickness_reference.py [--seed 3] [--cases sagittal:R,oblique:L] [--size full]

Needs pymskt (PyPI ``mskt``, the ``bench`` extra: ``pip install -e '.[bench]'`` in an environment of its
own, as its VTK/pyvista stack is not the node's). On each phantom both measure the truth labels:

* the node: ``worker.analysis.analyse`` (rays from every bone-cartilage interface face, area-weighted);
* pymskt as the seed used it: ``BoneMesh(seg_image, label_idx=bone, list_cartilage_labels=[...])``,
  ``create_mesh()`` then ``calc_cartilage_thickness()`` with its defaults (Gaussian variance 0.3125/2 on the
  masks, marching cubes at 0.5, rays of 10 mm from each bone vertex, a quarter of it into the bone); a
  vertex's thickness counts where it is > 0, and the vertex belongs to the subregion of the nearest cartilage
  voxel in the phantom's own subregion map (the same regions for both, from the truth).

It prints per subregion the truth, each method's mean and error, and the time of each (pymskt: the three
bones' meshing and ray casting; the node: the whole analysis) with their ratio.

Measured (seed 3, full size, sagittal right and oblique left knee, the shared 2-core machine under load):
median |error| over the subregions 0.8 % for the node, 1.5 % for pymskt (which reads the weight-bearing
femur 5-7 % thin); the node's worst +5.4 % (femoral anterior), pymskt's -7.1 %; pymskt took 27-45× the
node's time (66-147 s against 2.5-3.2 s).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from openmsk.phantom import Phantom, generate
from openmsk.regions import REGIONS
from worker.analysis import analyse

# Bone label -> the cartilage labels it carries (openmsk.labels).
BONES = {1: [4], 2: [5, 6], 3: [7]}


def pymskt_region_means(phantom: Phantom) -> tuple[dict[str, float | None], float]:
    """Mean pymskt thickness per subregion (vertices with thickness > 0) and the seconds it took."""
    import SimpleITK as sitk
    from pymskt.mesh import BoneMesh
    from scipy.spatial import cKDTree

    sp = np.asarray(phantom.spacing, dtype=np.float64)
    # Origin 0 and identity directions: the mesh lives in the grid's mm space (index × spacing).
    image = sitk.GetImageFromArray(np.ascontiguousarray(phantom.labels.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in sp))
    assert phantom.regions is not None
    start = time.perf_counter()
    values: dict[int, list[np.ndarray]] = {label: [] for label in REGIONS}
    for bone, cartilages in BONES.items():
        mesh = BoneMesh(seg_image=image, label_idx=bone, list_cartilage_labels=cartilages)
        mesh.create_mesh()
        mesh.calc_cartilage_thickness()
        thickness = np.asarray(mesh.point_data["thickness (mm)"])
        points = np.asarray(mesh.points)
        covered = thickness > 0
        voxels = np.argwhere(np.isin(phantom.labels, cartilages))
        nearest = cKDTree(voxels * sp).query(points[covered], k=1)[1]
        region = phantom.regions[tuple(voxels[nearest].T)]
        for label in np.unique(region):
            values[int(label)].append(thickness[covered][region == label])
    elapsed = time.perf_counter() - start
    means: dict[str, float | None] = {}
    for label, region in REGIONS.items():
        found = np.concatenate(values[label]) if values[label] else np.zeros(0)
        means[region.name] = float(found.mean()) if len(found) else None
    return means, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--cases", default="sagittal:R,oblique:L", help="orientation:laterality,...")
    parser.add_argument("--size", default="full", choices=("small", "medium", "full"))
    args = parser.parse_args()

    node_all, ref_all, ratios = [], [], []
    for case in args.cases.split(","):
        orientation, laterality = case.split(":")
        phantom = generate(args.seed, args.size, orientation, laterality)
        start = time.perf_counter()
        measured = analyse(phantom.labels, phantom.spacing)
        node_s = time.perf_counter() - start
        reference, ref_s = pymskt_region_means(phantom)
        ratios.append(ref_s / node_s)
        print(
            f"{orientation} {laterality} {args.size}: node {node_s:.2f} s, pymskt {ref_s:.1f} s ({ref_s / node_s:.0f}×)"
        )
        print(f"  {'subregion':26s} {'truth':>6s} {'node':>6s} {'err':>7s} {'pymskt':>6s} {'err':>7s}")
        for name, entry in measured["regions"].items():
            truth = phantom.truth["regions"][name]["thickness_mm"]
            node = entry["thickness_mm"]["mean"] if entry["thickness_mm"] else None
            ref = reference[name]
            node_err = None if node is None else node / truth - 1
            ref_err = None if ref is None else ref / truth - 1
            if node_err is not None:
                node_all.append(abs(node_err))
            if ref_err is not None:
                ref_all.append(abs(ref_err))
            print(f"  {name:26s} {truth:6.2f} {_f(node)} {_pct(node_err)} {_f(ref)} {_pct(ref_err)}")
    print(
        f"median |error| over subregions and cases: node {100 * float(np.median(node_all)):.1f} %, "
        f"pymskt {100 * float(np.median(ref_all)):.1f} %; pymskt takes {float(np.median(ratios)):.0f}× the node's time"
    )


def _f(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.3f}"


def _pct(value: float | None) -> str:
    return "      -" if value is None else f"{100 * value:+6.1f}%"


if __name__ == "__main__":
    main()
