"""Per-stage time of the worker's pipeline on a full-size phantom (384×384×160), and the overhead around inference.

Target: everything except ``infer`` ≤ 3 s on the 2-core development machine. Baseline named for the ratio: the seed
service's ~3.5 min for meshes and thickness (its non-inference part).

    .venv/bin/python bench/pipeline.py [--model nnunet_fullres] [--size full]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stage_timer import StageTimer
from openmsk.config import load_settings
from openmsk.models.registry import load_registry
from openmsk.models.segmenter import load_segmenter
from openmsk.phantom import generate, write_series
from worker.pipeline import segment_volume
from worker.volume import load_series, read_series
from worker.warmup import warm_up_outputs

SEED_NON_INFERENCE_S = 210.0  # seed service: meshes + thickness, ~3.5 min per knee


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--size", default="full", choices=("small", "full"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    settings = load_settings()
    registry = load_registry(settings.model_registry)
    entry = registry.get(args.model) if args.model else registry.default
    # As a worker starts: model loaded, write/analyse warmed up (worker.process.preload_default_model).
    segmenter = load_segmenter(entry, args.device)
    print(f"warm-up of the write/analyse stages: {warm_up_outputs():.1f} s (at worker start, not per job)")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_series(generate(seed=900, size=args.size), out / "in")
        timer = StageTimer()
        timer("load", 0.0)
        volume = load_series(read_series(out / "in" / "dicom"))
        segment_volume(volume, segmenter, entry, out / "out", timer)
        total = time.perf_counter() - timer.starts["load"]

    durations = timer.durations()
    print(f"model {entry.name} on {segmenter.device}, phantom {args.size} {volume.image.shape}")
    for name, seconds in durations.items():
        print(f"  {name:<12} {seconds:7.2f} s")
    overhead = total - durations.get("infer", 0.0)
    print(f"  {'total':<12} {total:7.2f} s")
    print(f"overhead (all but infer): {overhead:.2f} s  (target ≤ 3 s)")
    print(
        f"ratio overhead / seed non-inference ({SEED_NON_INFERENCE_S:.0f} s): {overhead / SEED_NON_INFERENCE_S:.3f}"
    )


if __name__ == "__main__":
    main()
