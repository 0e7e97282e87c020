"""``openmsk web``: run the web server against shared Redis and Orthanc; ``--hash-password`` makes a hash for
``OPENMSK_WEB_USERS``. ``openmsk viewer``: the OHIF viewer's server on its own port."""

from __future__ import annotations

import argparse
import getpass
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("web", help="run the web server in the foreground")
    parser.add_argument(
        "--hash-password",
        action="store_true",
        help="read a password (twice) and print its hash for OPENMSK_WEB_USERS=user:hash, then exit",
    )
    parser.set_defaults(func=_run)
    viewer = subparsers.add_parser(
        "viewer", help="serve the OHIF viewer and its DICOMweb proxy in the foreground"
    )
    viewer.set_defaults(func=_viewer)


def _viewer(args: argparse.Namespace) -> int:
    from openmsk.config import load_settings
    from web.viewer import serve

    return serve(load_settings())


def _run(args: argparse.Namespace) -> int:
    if args.hash_password:
        return _hash_password()
    from openmsk.config import load_settings
    from web.server import serve

    return serve(load_settings())


def _hash_password() -> int:
    from web.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("openmsk: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("openmsk: use a password of at least 8 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0
