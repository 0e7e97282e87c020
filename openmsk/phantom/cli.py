"""``openmsk phantom``: write one synthetic knee MRI series with its ground truth.

Only argparse is imported here; numpy and pydicom load when the command runs, so ``openmsk --help`` stays
fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

# The package's __init__ is light (no numpy/pydicom), so its constants are safe to import here.
from openmsk.phantom import LATERALITIES, ORIENTATIONS, SIZES


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``phantom`` subcommand to an argparse *subparsers* object; returns its parser."""
    parser = subparsers.add_parser(
        "phantom",
        help="write a synthetic knee MRI series (DICOM) with labels.nii.gz and truth.json",
        description="Write a synthetic 3D DESS-like knee MRI series with exact ground-truth labels. "
        "Same arguments, same bytes and UIDs.",
    )
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="directory for dicom/, labels.nii.gz and truth.json"
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="non-negative integer; controls anatomy, contrast, noise and UIDs (default 0)",
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="small",
        help="small: 64x64x40 at 1.6x1.6x2.4 mm; medium: 128x128x80 at 0.8x0.8x1.4 mm; "
        "full: 384x384x160 at 0.36x0.36x0.7 mm",
    )
    parser.add_argument(
        "--orientation",
        choices=ORIENTATIONS,
        default="sagittal",
        help="image plane; oblique is sagittal turned 15-20 degrees about the superior axis",
    )
    parser.add_argument("--laterality", choices=LATERALITIES, default="R", help="knee side (default R)")
    parser.add_argument(
        "--thin",
        metavar="REGION=MM",
        action="append",
        type=_thinning,
        default=[],
        help="follow-up visit of the same patient: cartilage of subregion REGION (e.g. "
        "femoral_medial_central) thinner by MM; repeatable",
    )
    parser.add_argument(
        "--echoes",
        choices=("qdess", "mese"),
        help="write a multi-echo series instead, with known T2 per tissue in truth.json: qdess (two echoes, "
        "GE spoiler tags) or mese (7 echoes, TE 10-70 ms); Rician noise at SNR 40",
    )
    parser.set_defaults(func=run)
    return parser


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("seed must be a non-negative integer")
    return value


def _thinning(text: str) -> tuple[str, float]:
    name, sep, mm = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name.strip(), float(mm)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected REGION=MM, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Generate and write the phantom described by *args*; print where it went. Returns the exit code."""
    from openmsk.phantom import generate, write_series

    if args.echoes:
        from openmsk.phantom.echoes import generate_echoes, write_echo_series

        echo = generate_echoes(
            args.echoes,
            args.seed,
            args.size,
            args.orientation,
            args.laterality,
            thinning=dict(getattr(args, "thin", [])) or None,
        )
        paths = write_echo_series(echo, args.out_dir)
        print(
            f"{args.echoes} phantom: {len(echo.echo_times_ms)} echoes in {paths['dicom_dir']}, truth {paths['truth']}"
        )
        return 0
    phantom = generate(
        seed=args.seed,
        size=args.size,
        orientation=args.orientation,
        laterality=args.laterality,
        thinning=dict(getattr(args, "thin", [])) or None,
    )
    paths = write_series(phantom, args.out_dir)
    nx, ny, nz = phantom.image.shape
    print(
        f"phantom seed={args.seed} {args.size} {args.orientation} {args.laterality}: "
        f"{nz} slices of {ny}x{nx} in {paths['dicom_dir']}, labels {paths['labels']}, truth {paths['truth']}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m openmsk.phantom.cli``) until the top-level CLI wires this in."""
    parser = argparse.ArgumentParser(prog="openmsk")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
