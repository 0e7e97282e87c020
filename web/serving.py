"""Run a WSGI app with waitress until SIGTERM/SIGINT: the web app (``web.server``) and the viewer."""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import TYPE_CHECKING

from waitress.server import create_server

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

log = logging.getLogger("openmsk.web")

THREADS = 8  # request threads of the web app (the viewer's proxy needs more: web.viewer)
# A connection that sends nothing for this long is closed (checked every CLEANUP_INTERVAL_S). Waitress reads
# bodies without a thread, so a slow client holds a socket, never a request thread; this frees the socket.
IDLE_TIMEOUT_S = 60
CLEANUP_INTERVAL_S = 10


def run_until_signal(
    app: WSGIApplication, host: str, port: int, max_body: int, name: str, threads: int = THREADS
) -> None:
    """Serve *app* with waitress on *host:port* until SIGTERM/SIGINT (the web app and the viewer)."""
    server = create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        ident="openmsk",
        max_request_body_size=max_body,
        expose_tracebacks=False,
        channel_timeout=IDLE_TIMEOUT_S,
        cleanup_interval=CLEANUP_INTERVAL_S,
    )

    def shut_down(*_: object) -> None:
        raise SystemExit(0)  # unwinds waitress's event loop in the main thread

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shut_down)
    log.info("%s listening on http://%s:%d", name, host, port)
    try:
        with contextlib.suppress(SystemExit):
            server.run()
    finally:
        server.close()
