"""The GPU path, checked whenever a CUDA machine is at hand: the full-size phantom on CUDA and on CPU.

    .venv/bin/python bench/gpu.py [--model nnunet_fullres]

Prints the inference time on each device and the ratio cuda/cpu; on a machine without CUDA it says so and runs
the CPU only (exit status 0, so it can run anywhere).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.stage_timer import StageTimer
from openmsk.config import load_settings
from openmsk.models.registry import load_registry
from openmsk.phantom import generate, write_series
from worker.models.segmenter import load_segmenter
from worker.pipeline import segment_volume
from worker.volume import load_series, read_series


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--size", default="full", choices=("small", "full"))
    args = parser.parse_args()
    registry = load_registry(load_settings().model_registry)
    entry = registry.get(args.model) if args.model else registry.default
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    if "cuda" not in devices:
        print("no CUDA device: running the CPU only")
    else:
        print(f"CUDA device: {torch.cuda.get_device_name()}")
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_series(generate(seed=901, size=args.size), out / "in")
        volume = load_series(read_series(out / "in" / "dicom"))
        for device in devices:
            segmenter = load_segmenter(entry, device)
            segment_volume(volume, segmenter, entry, out / f"warm-{device}", lambda *_: None)  # warm-up
            timer = StageTimer()
            segment_volume(volume, segmenter, entry, out / device, timer)
            times[device] = timer.durations()["infer"]
            print(f"{entry.name} infer on {device}: {times[device]:.2f} s  {volume.image.shape}")
    if len(times) == 2:
        print(f"ratio cuda/cpu: {times['cuda'] / times['cpu']:.3f}")


if __name__ == "__main__":
    main()
