"""``openmsk web``: run the web server against shared Redis and Orthanc."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("web", help="run the web server in the foreground")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from openmsk.config import load_settings
    from web.server import serve

    return serve(load_settings())
