"""``openmsk scp`` (run the DICOM receiver) and ``openmsk route test PATH`` (dry-run the routing rules)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openmsk.config import Settings
    from scp.routing import RoutingRules


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``scp`` and ``route`` commands to the ``openmsk`` parser."""
    scp = subparsers.add_parser(
        "scp", help="run the DICOM Storage SCP in the foreground (until SIGTERM/Ctrl-C)"
    )
    scp.set_defaults(func=run_scp)

    route = subparsers.add_parser("route", help="routing rules: which series go to which models")
    route_commands = route.add_subparsers(dest="route_command", metavar="ACTION", required=True)
    test = route_commands.add_parser(
        "test", help="dry-run the rules over a folder of DICOM files: per series, which rule matched and why"
    )
    test.add_argument("path", type=Path, help="a DICOM file or a folder searched recursively")
    test.add_argument("--rules", type=Path, help="a rules file (default: OPENMSK_ROUTING_RULES)")
    test.add_argument("--calling-ae", help="the calling AE title to assume (default: from each file's meta)")
    test.add_argument(
        "--called-ae", help="the called AE title to assume (default: from the file meta, else ours)"
    )
    test.set_defaults(func=route_test)


def run_scp(args: argparse.Namespace) -> int:
    from openmsk.config import load_settings
    from scp.server import run_forever

    settings = load_settings()
    rules = check_start(settings)  # a rule naming a destination that does not exist: one line, exit 2
    return run_forever(settings, rules)


def check_start(settings: Settings) -> RoutingRules:
    """The SCP's start-up check: the rules load and every destination they name is configured.

    Raises :class:`ConfigError` (one line; ``openmsk`` prints it and exits 2) — not minutes later, when the
    first delivery or forward to a missing destination would have run out of retries.
    """
    from openmsk.config import ConfigError
    from scp.server import load_rules

    rules = load_rules(settings)
    problems = _destination_problems(rules, settings)
    if problems:
        raise ConfigError("; ".join(problems))
    return rules


def _destination_problems(rules: RoutingRules, settings: Settings) -> list[str]:
    from destinations import DestinationConfigError, check_routing
    from openmsk.config import ConfigError, env_name

    try:
        return check_routing(rules, settings)
    except DestinationConfigError as exc:
        raise ConfigError(f"{env_name('destinations')}: {exc}") from None


def route_test(args: argparse.Namespace) -> int:
    """Print, per series under ``args.path``, the deciding rule and every other rule's reasons."""
    from dataclasses import replace

    from destinations import default_archive
    from openmsk.config import load_settings
    from scp.routing import format_decision, series_from_files
    from scp.server import load_rules

    settings = load_settings(**({"routing_rules": args.rules} if args.rules is not None else {}))
    rules = load_rules(settings)  # a bad file raises ConfigError: `openmsk` prints it and exits 2
    # The SCP's start-up check: report what would stop it, and still show the dry run.
    problems = _destination_problems(rules, settings)
    for problem in problems:
        print(f"openmsk route test: the SCP would not start: {problem}", file=sys.stderr)
    failed = 2 if problems else 0
    path: Path = args.path
    if not path.exists():
        print(f"openmsk route test: {path} does not exist", file=sys.stderr)
        return 2
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    series = series_from_files(files)
    if not series:
        print(f"openmsk route test: no DICOM series found under {path}", file=sys.stderr)
        return failed or 1
    archive_default = default_archive(settings)
    print(f"rules: {rules.source}  ({len(rules.rules)} rules, {len(files)} file(s), {len(series)} series)\n")
    for info in series:
        if args.calling_ae is not None:
            info = replace(info, calling_ae=args.calling_ae)
        if args.called_ae is not None:
            info = replace(info, called_ae=args.called_ae)
        elif not info.called_ae:
            info = replace(info, called_ae=settings.scp_ae_title)
        print(format_decision(info, rules.route(info), archive_default))
        print()
    return failed
