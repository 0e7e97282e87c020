"""``openmsk worker`` (one worker process) and ``openmsk segment`` (the same stages, once, from the shell)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openmsk.config import Settings

log = logging.getLogger("openmsk.worker")


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

    settings = load_settings()
    check_start(settings)  # before torch is imported: a bad destinations file stops the worker in a second
    from worker.process import run_worker

    return run_worker(settings)


def check_start(settings: Settings) -> None:
    """The worker's start-up check: its destinations file is usable and, when ``OPENMSK_ROUTING_RULES`` is
    set and readable, every destination those rules name is configured here.

    Raises :class:`ConfigError` (one line; ``openmsk`` prints it and exits 2). Rules that do not load are
    only logged: the worker does not route, and the SCP refuses them with the full message.
    """
    from destinations import DestinationConfigError, check_routing, configured_destination_names
    from openmsk.config import ConfigError, env_name
    from openmsk.routing import DEFAULT_MODEL, RoutingError, RoutingRules

    try:
        configured_destination_names(settings)
        if "routing_rules" not in settings.model_fields_set or not settings.routing_rules.is_file():
            return
        try:
            rules = RoutingRules.load(settings.routing_rules, DEFAULT_MODEL)  # models are not checked here
        except RoutingError as exc:
            log.warning("%s: %s; not checked against the destinations", env_name("routing_rules"), exc)
            return
        problems = check_routing(rules, settings)
    except DestinationConfigError as exc:
        raise ConfigError(f"{env_name('destinations')}: {exc}") from None
    if problems:
        raise ConfigError("; ".join(problems))


def _segment(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from openmsk.config import load_settings
    from openmsk.models.registry import RegistryError, load_registry
    from worker.errors import JobFailure
    from worker.inputs import load_input
    from worker.models.segmenter import SegmenterError, load_segmenter
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
