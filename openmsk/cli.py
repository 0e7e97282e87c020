"""The ``openmsk`` command line: one entry point, sub-commands registered by the module that owns them.

The shared core names no room: the modules that add sub-commands are the package's ``openmsk.commands`` entry
points (``pyproject.toml``), each a module with ``register(subparsers)``. They are imported only to declare their
arguments; they import heavy libraries (torch, pynetdicom, nnunetv2) inside their handlers, so
``openmsk --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from importlib import import_module
from importlib.metadata import distributions

from openmsk import __version__, audit
from openmsk.config import ConfigError, load_settings

COMMAND_GROUP = "openmsk.commands"  # entry points: one per module with register(subparsers)


def command_modules() -> list[str]:
    """The modules that register sub-commands (the package's ``openmsk.commands`` entry points)."""
    names: dict[str, str] = {}
    # Every copy of the package's metadata on the path, not only the first: a stale ``openmsk.egg-info`` left in
    # the working directory by an older build would otherwise hide the installed entry points.
    for dist in distributions(name="openmsk"):
        for entry in dist.entry_points.select(group=COMMAND_GROUP):
            names.setdefault(entry.name, entry.value)
        if names:
            break
    if not names:
        raise SystemExit(
            f"openmsk: no sub-commands registered (entry points {COMMAND_GROUP!r}); "
            "reinstall the package: pip install -e ."
        )
    return list(names.values())


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
    for name in command_modules():
        import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # highdicom logs every attribute module it copies at INFO: noise in a node's log.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # The process's audit log (DATA_DIR/audit), for code without settings at hand (the worker's job store);
    # a bad setting is left to the command itself to report.
    with contextlib.suppress(ConfigError):
        audit.install(audit.AuditLog(load_settings().data_path))
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
