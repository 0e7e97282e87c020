"""Per-job inference time: the worker's warm segmenter vs a cold ``nnUNetv2_predict`` command, side by side.

A worker loads a model once and keeps it; the naive integration runs ``nnUNetv2_predict`` per job, paying the
interpreter start, nnU-Net's imports, model loading, NIfTI I/O and its worker processes every time. Both run
here on the same full-size phantom (384×384×160, reoriented to the canonical orientation and written as a
NIfTI in nnU-Net raw format for the command) with the same model folder, and their label maps are compared, so
the timing is of the same computation. Target: warm / cold ≤ 0.5.

    .venv/bin/python bench/inference.py [--model nnunet_fullres] [--size full] [--device auto] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openmsk.config import load_settings
from openmsk.models.registry import ModelEntry, load_registry
from openmsk.phantom import generate
from worker.device import resolve_device
from worker.models.segmenter import load_segmenter, to_canonical

TARGET_RATIO = 0.5


def cold_predict(entry: ModelEntry, nifti_dir: Path, out_dir: Path, device: str) -> float:
    """Wall time of ``nnUNetv2_predict`` (both stages of a cascade), as a fresh process per job runs it."""
    env = dict(os.environ)
    scratch = out_dir.parent / "nnunet-env"
    env.update(
        nnUNet_results=str(entry.folder),
        nnUNet_raw=str(scratch / "raw"),
        nnUNet_preprocessed=str(scratch / "preprocessed"),
    )
    exe = Path(sys.executable).with_name("nnUNetv2_predict")
    common = [
        "-d",
        str(entry.dataset),
        "-tr",
        entry.trainer,
        "-p",
        entry.plans,
        "-f",
        *map(str, entry.folds),
        "-chk",
        entry.checkpoint,
        "-device",
        device,
        "-npp",
        "1",
        "-nps",
        "1",
        "--disable_progress_bar",
    ]
    started = time.perf_counter()
    previous: Path | None = None
    for configuration in entry.configurations:
        stage_out = out_dir / configuration
        command = [str(exe), "-i", str(nifti_dir), "-o", str(stage_out), "-c", configuration, *common]
        if previous is not None:
            command += ["-prev_stage_predictions", str(previous)]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        previous = stage_out
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="nnunet_fullres", help="an nnU-Net model of the registry")
    parser.add_argument("--size", default="full", choices=("small", "full"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=2, help="jobs per side (the warm side is loaded once)")
    args = parser.parse_args()
    import nibabel as nib

    entry = load_registry(load_settings().model_registry).get(args.model)
    if entry.kind not in ("nnunet", "nnunet_cascade"):
        print(f"{entry.name} is not an nnU-Net model; nnUNetv2_predict cannot run it", file=sys.stderr)
        return 2
    device = resolve_device(args.device)

    started = time.perf_counter()
    phantom = generate(seed=901, size=args.size)
    print(f"phantom {args.size} {phantom.image.shape} generated in {time.perf_counter() - started:.1f} s")
    canonical = to_canonical(phantom.image, phantom.affine_lps)

    started = time.perf_counter()
    segmenter = load_segmenter(entry, device)
    print(f"warm segmenter {entry.name} loaded once on {device} in {time.perf_counter() - started:.1f} s")

    with tempfile.TemporaryDirectory(prefix="openmsk-bench-") as tmp:
        work = Path(tmp)
        nifti_dir = work / "imagesTs"
        nifti_dir.mkdir()
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ canonical.affine
        nib.save(nib.Nifti1Image(canonical.image, ras), nifti_dir / "knee_000_0000.nii.gz")

        warm, cold = [], []
        for job in range(args.repeat):
            started = time.perf_counter()
            labels = segmenter.segment(canonical.image.astype(np.float32), canonical.spacing)
            warm.append(time.perf_counter() - started)
            out_dir = work / f"cold-{job}"
            cold.append(cold_predict(entry, nifti_dir, out_dir, device))
            print(f"job {job + 1}: warm {warm[-1]:6.1f} s   cold nnUNetv2_predict {cold[-1]:6.1f} s")
        final = out_dir / entry.configurations[-1] / "knee_000.nii.gz"
        cold_labels = segmenter.canonical_labels(np.asarray(nib.load(final).dataobj))
        agreement = float((cold_labels == labels).mean())
        shutil.rmtree(work / "nnunet-env", ignore_errors=True)

    w, c = float(np.median(warm)), float(np.median(cold))
    print(f"\nmodel {entry.name} ({', '.join(entry.configurations)}) on {device}, {os.cpu_count()} CPU cores")
    print(f"per job (median of {args.repeat}): warm segmenter {w:.1f} s, cold nnUNetv2_predict {c:.1f} s")
    print(f"ratio warm / cold: {w / c:.2f} (target <= {TARGET_RATIO})")
    print(f"voxels where both label maps agree: {agreement:.4%} (same model, same axis order)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
