"""``openmsk worker`` (one worker process) and ``openmsk segment`` (the same stages, once, from the shell)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("worker", help="run one worker (inference) process in the foreground")
    parser.set_defaults(func=_run)
    segment = subparsers.add_parser(
        "segment", help="segment one DICOM folder, zip, NIfTI or NRRD and write the results to a folder"
    )
    segment.add_argument("input", type=Path, help="DICOM folder, zip of one series, .nii/.nii.gz or .nrrd")
    segment.add_argument("--model", help="model name (default: the registry's default model)")
    segment.add_argument("--out", type=Path, required=True, help="output folder")
    segment.add_argument("--labelmap", action="store_true", help="write a Label Map SEG instead of BINARY")
    segment.set_defaults(func=_segment)


def _run(args: argparse.Namespace) -> int:
    from openmsk.config import load_settings
    from worker.process import run_worker

    return run_worker(load_settings())


def _segment(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from openmsk.config import load_settings
    from openmsk.models.registry import RegistryError, load_registry
    from openmsk.models.segmenter import SegmenterError, load_segmenter
    from worker.errors import JobFailure
    from worker.inputs import load_input
    from worker.pipeline import overall_percent, segment_volume

    settings = load_settings()
    try:
        registry = load_registry(settings.model_registry)
        entry = registry.get(args.model) if args.model else registry.default
    except RegistryError as exc:
        print(f"openmsk: error: {exc}", file=sys.stderr)
        return 2
    bar = tqdm(
        total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}]", file=sys.stderr
    )

    def progress(stage: str, fraction: float) -> None:
        bar.set_description(stage)
        bar.n = overall_percent(stage, fraction)
        bar.refresh()

    try:
        progress("load", 0.0)
        volume = load_input(args.input)
        progress("load", 1.0)
        segmenter = load_segmenter(entry, settings.device)
        outputs = segment_volume(
            volume,
            segmenter,
            entry,
            args.out,
            progress,
            dicom_outputs=bool(volume.sources),
            labelmap_seg=args.labelmap,
        )
    except JobFailure as failure:
        bar.close()
        print(f"openmsk: {failure.code.value}: {failure.message}. {failure.hint}", file=sys.stderr)
        return 1
    except (RegistryError, SegmenterError) as exc:  # the model's files: missing, corrupt, wrong hash
        bar.close()
        print(f"openmsk: error: {exc}", file=sys.stderr)
        return 2
    progress("deliver", 1.0)
    bar.close()
    for path in outputs.files:
        print(path)
    return 0
