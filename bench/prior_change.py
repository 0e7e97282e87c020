"""Change since the prior visit on full-size phantoms: a follow-up 0.3 mm thinner in one subregion, compared
with its baseline through the node's analysis (truth labels) and worker/prior.py, on the baseline's grid and on
other acquisition planes.

Target (issue 18): the change in the thinned region within 0.1 mm of the truth, every untouched region's
change under 0.05 mm. Printed per follow-up: the thinned region's error and the largest untouched change.

    .venv/bin/python bench/prior_change.py [--size full] [--region femoral_medial_central] [--mm 0.3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openmsk.phantom import generate
from openmsk.regions import REGIONS_BY_NAME
from worker.analysis import analyse
from worker.prior import Prior, compare, mean_thicknesses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="full")
    parser.add_argument("--region", default="femoral_medial_central", choices=sorted(REGIONS_BY_NAME))
    parser.add_argument("--mm", type=float, default=0.3)
    parser.add_argument("--laterality", default="R")
    args = parser.parse_args()

    base = generate(seed=4, size=args.size, orientation="sagittal", laterality=args.laterality)
    prior = Prior("20240101", "1.2.3", "truth", "1", mean_thicknesses(analyse(base.labels, base.spacing)))
    print(f"baseline sagittal {args.size}, {args.region} thinned by {args.mm} mm")
    for orientation in ("sagittal", "coronal", "axial", "oblique"):
        follow = generate(
            seed=4,
            size=args.size,
            orientation=orientation,
            laterality=args.laterality,
            thinning={args.region: args.mm},
        )
        change = compare(analyse(follow.labels, follow.spacing), prior, "truth", "1")["regions"]
        thinned = change[args.region]["thickness_mean_mm"]
        others = {
            n: abs(c["thickness_mean_mm"])
            for n, c in change.items()
            if n in REGIONS_BY_NAME and n != args.region and c["thickness_mean_mm"] is not None
        }
        worst = max(others, key=others.get) if others else "-"
        print(
            f"  follow-up {orientation:9s} thinned {thinned:+.3f} mm (error {thinned + args.mm:+.3f}, target ±0.1)"
            f"   largest untouched {others.get(worst, float('nan')):.3f} mm ({worst}, target < 0.05)"
        )


if __name__ == "__main__":
    main()
