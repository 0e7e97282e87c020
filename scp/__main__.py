"""``python -m scp``: the same as ``openmsk scp`` (run the Storage SCP in the foreground)."""

import logging
import sys

from openmsk.config import ConfigError, load_settings
from scp.cli import check_start
from scp.server import run_forever

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        sys.exit(run_forever(settings, check_start(settings)))
    except ConfigError as exc:
        print(f"openmsk scp: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
