"""Serve the web app with waitress (a production WSGI server; never Flask's development server)."""

from __future__ import annotations

import logging
import signal

from waitress.server import create_server

from openmsk.config import Settings
from web import create_app

log = logging.getLogger("openmsk.web")


def serve(settings: Settings) -> int:
    app = create_app(settings)
    server = create_server(app, host=settings.web_host, port=settings.web_port, threads=8, ident="openmsk")

    def shut_down(*_: object) -> None:
        raise SystemExit(0)  # unwinds waitress's event loop in the main thread

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shut_down)
    log.info("web listening on http://%s:%d", settings.web_host, settings.web_port)
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        server.close()
    return 0
