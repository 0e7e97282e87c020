"""Worker heartbeats: free GPU memory is measured on every beat, by a probe the worker passes in."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from openmsk.heartbeat import KEY_PREFIX, Heartbeat


def stored(client: redis.Redis, heartbeat: Heartbeat) -> dict[str, Any]:
    """The heartbeat record as it is in Redis now."""
    raw = client.get(KEY_PREFIX + heartbeat.ident)
    assert raw is not None, "no heartbeat in Redis"
    return json.loads(raw)


def test_gpu_free_memory_is_measured_on_every_beat(redis_client: redis.Redis) -> None:
    readings = iter([8_000_000_000, 3_000_000_000])
    info = {"device": "cuda", "gpu": "Test GPU", "gpu_free_bytes": 9_000_000_000}
    heartbeat = Heartbeat(redis_client, info, stale_s=30.0, gpu_free=lambda: next(readings))
    heartbeat.beat_once()
    first = stored(redis_client, heartbeat)
    heartbeat.beat_once()
    second = stored(redis_client, heartbeat)
    assert first["gpu_free_bytes"] == 8_000_000_000
    assert second["gpu_free_bytes"] == 3_000_000_000  # the second call of the probe, not a snapshot
    assert second["gpu"] == "Test GPU" and second["id"] == heartbeat.ident
    assert info["gpu_free_bytes"] == 9_000_000_000  # the worker's info is not modified


def test_without_a_probe_the_record_is_the_workers_info(redis_client: redis.Redis) -> None:
    heartbeat = Heartbeat(redis_client, {"device": "cpu", "gpu": None, "gpu_free_bytes": None}, stale_s=30.0)
    heartbeat.beat_once()
    record = stored(redis_client, heartbeat)
    assert record["device"] == "cpu" and record["gpu_free_bytes"] is None


def test_a_failing_probe_does_not_stop_the_beats(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:

    def broken() -> int:
        raise RuntimeError("CUDA error: device lost")

    heartbeat = Heartbeat(redis_client, {"device": "cuda"}, stale_s=30.0, gpu_free=broken)
    heartbeat.beat_once()
    record = stored(redis_client, heartbeat)
    assert record["gpu_free_bytes"] is None
    assert "device lost" in caplog.text


def test_the_worker_probe_is_absent_on_cpu() -> None:
    from worker.device import gpu_free_bytes, gpu_free_probe

    assert gpu_free_probe("cpu") is None
    assert gpu_free_probe("cuda") is gpu_free_bytes
