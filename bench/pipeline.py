"""Per-stage time of the worker's pipeline on a full-size phantom (384×384×160), and the overhead around inference.

Target: everything except ``infer`` ≤ 3 s on the 2-core development machine. Baseline named for the ratio: the seed
service's ~3.5 min for meshes and thickness (its non-inference part).

The development machine is a shared VM whose speed drifts by a quarter from run to run, so one job says little:
``--repeat N`` runs the stages after the network N more times on the same network output (``infer`` is not part
of the overhead) and prints each overhead and their median.

    .venv/bin/python bench/pipeline.py [--model nnunet_fullres] [--size full] [--repeat 5] [--without STEP]

``--without refine_cartilage`` alternates the repeats with the same entry less that step, for its cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stage_timer import StageTimer
from openmsk.config import load_settings
from openmsk.models.registry import ModelEntry, load_registry
from openmsk.phantom import generate, write_series
from worker.models.segmenter import Segmenter, load_segmenter
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
    parser.add_argument("--repeat", type=int, default=5, help="more runs after the network (0: none)")
    parser.add_argument(
        "--without",
        metavar="STEP",
        help="repeats alternate with the entry less this post-processing step (A/B)",
    )
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
        network = segmenter.predict
        outputs = []  # the network's output, for the repeats

        def predict_once(*call_args: Any, **call_kwargs: Any) -> Any:
            outputs.append(network(*call_args, **call_kwargs))
            return outputs[-1]

        segmenter.predict = predict_once  # type: ignore[method-assign]
        durations, total, shape = run_job(segmenter, entry, out)
        print(f"model {entry.name} on {segmenter.device}, phantom {args.size} {shape}")
        for name, seconds in durations.items():
            print(f"  {name:<12} {seconds:7.2f} s")
        overhead = total - durations.get("infer", 0.0)
        print(f"  {'total':<12} {total:7.2f} s")
        print(f"overhead (all but infer): {overhead:.2f} s  (target ≤ 3 s)")
        overheads = [overhead]
        if args.repeat > 0:
            segmenter.predict = lambda *_args, **_kwargs: outputs[0]  # type: ignore[method-assign]
            without = None
            if args.without:
                if args.without not in entry.postprocess:
                    parser.error(f"{entry.name} has no post-processing step {args.without!r}")
                without = replace(entry, postprocess=tuple(s for s in entry.postprocess if s != args.without))
            stages_with: list[dict[str, float]] = []
            stages_without: list[dict[str, float]] = []
            overheads_without: list[float] = []
            for _ in range(args.repeat):
                durations, total, _shape = run_job(segmenter, entry, out)
                overheads.append(total - durations.get("infer", 0.0))
                stages_with.append(durations)
                if without is not None:
                    durations, total, _shape = run_job(
                        segmenter, without, out
                    )  # its steps, not the registry's
                    overheads_without.append(total - durations.get("infer", 0.0))
                    stages_without.append(durations)
            print("overhead of each run: " + " ".join(f"{o:.2f}" for o in overheads) + " s")
            if without is not None:
                print(f"A/B, alternating runs: median per stage with and without {args.without}")
                for name in stages_with[0]:
                    a = statistics.median(d[name] for d in stages_with)
                    b = statistics.median(d.get(name, 0.0) for d in stages_without)
                    print(f"  {name:<12} {a:7.2f} s  {b:7.2f} s")
                print(
                    f"  {'overhead':<12} {statistics.median(overheads[1:]):7.2f} s  "
                    f"{statistics.median(overheads_without):7.2f} s"
                )
        median = statistics.median(overheads)
    print(f"overhead median of {len(overheads)}: {median:.2f} s  (target ≤ 3 s)")
    print(
        f"ratio overhead / seed non-inference ({SEED_NON_INFERENCE_S:.0f} s): {median / SEED_NON_INFERENCE_S:.3f}"
    )


def run_job(
    segmenter: Segmenter, entry: ModelEntry, folder: Path
) -> tuple[dict[str, float], float, tuple[int, ...]]:
    """One job on the series in ``folder/in``: seconds per stage, in all from loading to the end, and the
    volume's shape."""
    timer = StageTimer()
    timer("load", 0.0)
    volume = load_series(read_series(folder / "in" / "dicom"))
    segment_volume(volume, segmenter, entry, folder / "out", timer)
    return timer.durations(), time.perf_counter() - timer.starts["load"], volume.image.shape


if __name__ == "__main__":
    main()
