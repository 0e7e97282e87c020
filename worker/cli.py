"""``openmsk worker``: run one worker process against shared Redis."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("worker", help="run one worker (inference) process in the foreground")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from openmsk.config import load_settings
    from worker.process import run_worker

    return run_worker(load_settings())
