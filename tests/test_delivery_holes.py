"""Holes where a job could hang or be delivered when it must not: each ends in a state with a code.

A real worker process, a real Redis and an Orthanc that is configured but down (so deliveries keep retrying
while the test changes the world under them); the SCP's own Dispatcher queues the superseding job.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from openmsk.config import Settings
from openmsk.jobs import ErrorCode, JobState, JobStore
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.managed.process import free_port
from openmsk.models.registry import load_registry
from scp.dispatch import Dispatcher
from scp.routing import RoutingRules
from scp.server import StorageSCP
from scp.storage import InstanceStore
from tests.conftest import ORTHANC_PASSWORD, ORTHANC_USER
from tests.processes import openmsk, settings_env, wait_for
from tests.worker_harness import stage_phantom, submit


def test_delivery_failures_end_in_failed_with_a_code(settings: Settings, tmp_path: Path) -> None:
    orthanc = ManagedOrthanc(
        data_dir=tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port(),
        user=ORTHANC_USER, password=ORTHANC_PASSWORD,
    )  # fmt: skip
    destinations = tmp_path / "destinations.toml"
    destinations.write_text('[destinations.pacs]\ntype = "dicom"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
                            f"port = {free_port()}\n")  # fmt: skip
    env = settings_env(
        settings,
        OPENMSK_ORTHANC_URL=f"http://127.0.0.1:{orthanc.http_port}",  # configured, never started: down
        OPENMSK_ORTHANC_USER=ORTHANC_USER,
        OPENMSK_ORTHANC_PASSWORD=ORTHANC_PASSWORD,
        OPENMSK_DESTINATIONS=str(destinations),
        OPENMSK_DEVICE="cpu",
    )
    model = load_registry(settings.model_registry).default.name
    _, series_a = stage_phantom(settings.data_path, seed=4301)
    _, series_b = stage_phantom(settings.data_path, seed=4302, orientation="coronal")
    redis_url = str(settings.redis_url)
    store = JobStore.from_url(redis_url)
    worker = openmsk("worker", env, tmp_path / "worker.log")

    def retrying(job_id: str) -> bool:
        delivery = store.get(job_id).deliveries.get("orthanc")
        return delivery is not None and delivery.status == "retrying"

    try:
        # 1. A result file vanishes while the destination is down: the next attempt fails the job.
        lost = submit(redis_url, settings.data_path, series_a, model, ["orthanc"])
        wait_for(lambda: retrying(lost.id), 240, "first delivery attempt failed")
        seg = next(r for r in store.get(lost.id).results if r.path.endswith("seg.dcm"))
        (settings.data_path / seg.path).unlink()
        wait_for(lambda: store.get(lost.id).terminal, 30, "job with a lost result finished")
        error = store.get(lost.id).error
        assert error is not None and error.code is ErrorCode.DELIVERY_FAILED and "seg.dcm" in error.message

        # 2. A newer job for the same series and model is queued: the older one is never delivered.
        older = submit(redis_url, settings.data_path, series_b, model, ["orthanc"])
        wait_for(lambda: retrying(older.id), 240, "older job retrying its delivery")
        dispatcher = Dispatcher(
            settings.data_path, InstanceStore(settings.data_path), RoutingRules(()), redis_url
        )
        newer = store.get(older.id).model_copy(
            update={
                "id": uuid.uuid4().hex, "state": JobState.RECEIVED, "created_at": time.time(), "deliveries": {},
                "results": [], "idempotency_key": uuid.uuid4().hex, "state_times": {}, "attempts": 0,
            }
        )  # fmt: skip
        dispatcher.submit(newer)
        dispatcher.stop()
        wait_for(lambda: store.get(older.id).terminal, 120, "older job finished")
        older_now = store.get(older.id)
        assert older_now.error is not None and older_now.error.code is ErrorCode.SUPERSEDED
        assert older_now.deliveries["orthanc"].status != "done"

        # 3. The destinations file turns bad under a running worker: delivery fails with CONFIG_ERROR.
        wait_for(lambda: retrying(newer.id), 240, "newer job retrying its delivery")
        destinations.write_text("[destinations.pacs\n")
        wait_for(lambda: store.get(newer.id).terminal, 30, "job with a bad destinations file finished")
        error = store.get(newer.id).error
        assert error is not None and error.code is ErrorCode.CONFIG_ERROR
    finally:
        worker.kill()
        worker.wait(timeout=10)


def test_a_failed_dispatch_is_retried_on_a_timer(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox cannot be written (its folder is a file): the series is dispatched once it can."""
    import subprocess

    from scp import server

    monkeypatch.setattr(server, "DISPATCH_RETRY_S", 0.5)
    phantom, _ = stage_phantom(tmp_path / "elsewhere", seed=4303)
    files = sorted(str(p) for p in (phantom / "dicom").iterdir())
    configured = settings.model_copy(
        update={"series_quiet_s": 0.3, "series_timeout_s": 5.0, "min_free_disk_mb": 0}
    )
    store = JobStore.from_url(str(settings.redis_url))
    with StorageSCP(configured) as scp:
        spool = configured.data_path / "spool"
        spool.rmdir()
        spool.write_text("not a folder")
        subprocess.run(
            ["storescu", "-aec", configured.scp_ae_title, "127.0.0.1", str(scp.port), *files],
            check=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, timeout=60,
        )  # fmt: skip
        wait_for(lambda: scp._retry_dispatch, 30, "the dispatch failed and waits for its retry")
        assert store.count() == 0 and not scp.completed
        spool.unlink()
        spool.mkdir()
        wait_for(lambda: store.count() == 1, 30, "the series queued by the retry")
        wait_for(lambda: scp.completed, 10, "the retried dispatch recorded")  # appended just after queueing
        assert len(scp.completed) == 1 and scp.completed[0].series.instances == len(files)
