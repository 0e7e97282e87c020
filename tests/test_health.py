"""/health against real Redis, Orthanc, a worker process and the web server."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from openmsk.config import Settings
from openmsk.managed.orthanc import ManagedOrthanc
from tests.conftest import ORTHANC_PASSWORD, ORTHANC_USER
from tests.processes import health, openmsk, settings_env, wait_for


def test_worker_heartbeat_goes_stale_when_worker_is_killed(
    settings: Settings, orthanc_server: ManagedOrthanc, tmp_path: Path
) -> None:
    env = settings_env(
        settings,
        OPENMSK_ORTHANC_URL=orthanc_server.url,
        OPENMSK_ORTHANC_USER=ORTHANC_USER,
        OPENMSK_ORTHANC_PASSWORD=ORTHANC_PASSWORD,
        OPENMSK_MIN_FREE_DISK_MB="0",
    )
    web = openmsk("web", env, tmp_path / "web.log")
    worker = openmsk("worker", env, tmp_path / "worker.log")
    try:
        wait_for(lambda: health(settings.web_port)[0] in (200, 503), 30, "web answering")
        # The worker needs a few seconds (torch import) before its first heartbeat.
        wait_for(lambda: health(settings.web_port)[0] == 200, 60, "healthy with a worker")
        _, report = health(settings.web_port)
        assert report["status"] == "healthy"
        assert report["redis"] == "available" and report["orthanc"] == "available"
        assert report["worker"] == "available" and len(report["workers"]) == 1
        assert report["gpu"] == "none (cpu)"
        assert report["disk"]["free_bytes"] > 0
        assert any(m["status"] == "ok" for m in report["models"])

        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        started = time.monotonic()
        wait_for(lambda: health(settings.web_port)[0] == 503, 30, "503 after the worker died")
        waited = time.monotonic() - started
        _code, report = health(settings.web_port)
        assert report["status"] == "degraded" and report["worker"].startswith("unavailable")
        assert report["workers"] == []
        assert waited <= settings.worker_stale_s + 3
    finally:
        for proc in (web, worker):
            proc.kill()
            proc.wait(timeout=10)


def test_degraded_when_redis_is_gone(settings: Settings, tmp_path: Path) -> None:
    from openmsk.managed.process import free_port

    env = settings_env(settings, OPENMSK_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    web = openmsk("web", env, tmp_path / "web.log")
    try:
        wait_for(lambda: health(settings.web_port)[0] == 503, 30, "web answering")
        _, report = health(settings.web_port)
        assert report["status"] == "degraded" and report["redis"].startswith("unavailable")
        assert report["orthanc"] == "not configured"
    finally:
        web.terminate()
        assert web.wait(timeout=10) == 0
