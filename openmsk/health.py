"""The node's health: what ``GET /health`` reports, computed from live checks, never from assumptions.

``healthy`` needs Redis, at least one worker with a fresh heartbeat, Orthanc (when one is configured), enough
free disk, at least one usable model and the object store (when one is configured). Anything missing makes it
``degraded``, Redis too: the SCP keeps accepting studies while Redis is down (their jobs wait in its outbox on
disk, queued once Redis is back), so the node is degraded, not down. Only ``healthy`` answers HTTP 200.
"""

from __future__ import annotations

import shutil
from typing import Any

import redis
import requests

from openmsk.config import Settings
from openmsk.heartbeat import live_workers
from openmsk.models.registry import RegistryError, model_statuses
from openmsk.objectstore import ObjectStore, StorageError, store_for

AVAILABLE = "available"


def _redis_status(client: redis.Redis) -> str:
    try:
        client.ping()
        return AVAILABLE
    except redis.RedisError as exc:
        return f"unavailable: {type(exc).__name__}"


def _orthanc_status(settings: Settings) -> str:
    if settings.orthanc_url is None:
        return "not configured"
    auth = (settings.orthanc_user, settings.orthanc_password) if settings.orthanc_user else None
    try:
        response = requests.get(f"{settings.orthanc_url}/system", auth=auth, timeout=2)
    except requests.RequestException as exc:
        return f"unavailable: {type(exc).__name__}"
    if response.status_code != 200:
        return f"unavailable: HTTP {response.status_code}"
    return AVAILABLE


def _storage_status(settings: Settings, objects: ObjectStore | None) -> str:
    """The object store's answer (``"local"`` without one: DATA_DIR is the store)."""
    if not settings.storage_url:
        return "local"
    try:
        (objects or store_for(settings)).check()
    except StorageError as exc:
        return f"unavailable: {exc}"
    return AVAILABLE


def _gpu_status(workers: list[dict[str, Any]]) -> str:
    if not workers:
        return "unknown (no worker)"
    gpus = sorted({w["gpu"] for w in workers if w.get("gpu")})
    return ", ".join(gpus) if gpus else "none (cpu)"


def check_health(
    settings: Settings, client: redis.Redis, objects: ObjectStore | None = None
) -> dict[str, Any]:
    """Run every check once and return the report (``status`` is healthy or degraded)."""
    redis_state = _redis_status(client)
    workers = live_workers(client, settings.worker_stale_s) if redis_state == AVAILABLE else []
    worker_state = (
        AVAILABLE if workers else f"unavailable: no heartbeat in the last {settings.worker_stale_s:g} s"
    )
    orthanc_state = _orthanc_status(settings)
    storage_state = _storage_status(settings, objects)
    data = settings.data_path
    free = shutil.disk_usage(data if data.exists() else data.parent).free
    disk_ok = free >= settings.min_free_disk_mb * 1024 * 1024
    try:
        models = model_statuses(settings)
    except RegistryError as exc:
        models = [{"name": None, "status": f"registry unusable: {exc}"}]

    if (
        redis_state != AVAILABLE
        or worker_state != AVAILABLE
        or orthanc_state not in (AVAILABLE, "not configured")
        or storage_state not in (AVAILABLE, "local")
        or not disk_ok
        or not any(m["status"] == "ok" for m in models)
    ):
        status = "degraded"
    else:
        status = "healthy"
    return {
        "status": status,
        "redis": redis_state,
        "worker": worker_state,
        "workers": [
            {
                "id": w["id"],
                "device": w.get("device"),
                "gpu": w.get("gpu"),
                "gpu_free_bytes": w.get("gpu_free_bytes"),
            }
            for w in workers
        ],
        "orthanc": orthanc_state,
        "storage": storage_state,
        "gpu": _gpu_status(workers),
        "disk": {"free_bytes": free, "status": "ok" if disk_ok else "low"},
        "models": models,
    }
