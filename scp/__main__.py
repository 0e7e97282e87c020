"""``python -m scp``: the same as ``openmsk scp`` (run the Storage SCP in the foreground)."""

import logging
import sys

from openmsk.config import ConfigError, load_settings
from scp.server import run_forever

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(run_forever(load_settings()))
    except ConfigError as exc:
        print(f"openmsk scp: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
