"""The ``openmsk`` command line: one entry point, sub-commands registered by the module that owns them.

Modules listed here are imported only to declare their arguments; they import heavy libraries (torch,
pynetdicom, nnunetv2) inside their handlers, so ``openmsk --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from openmsk import __version__
from openmsk.config import ConfigError, load_settings

COMMAND_MODULES = (
    "scp.cli",
    "worker.cli",
    "web.cli",
    "openmsk.phantom.cli",
    "openmsk.models.cli",
    "openmsk.orthanc_query",
)


def _up(args: argparse.Namespace) -> int:
    from openmsk.node import up

    return up(load_settings())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openmsk", description="OpenMSK Node: knee MRI segmentation for the PACS"
    )
    parser.add_argument("--version", action="version", version=f"openmsk {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    up = subparsers.add_parser(
        "up", help="run the whole node: SCP, worker, web (and Redis/Orthanc when unset)"
    )
    up.set_defaults(func=_up)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # highdicom logs every attribute module it copies at INFO: noise in a node's log.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"openmsk: configuration error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"openmsk: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
