"""Worker heartbeats: free GPU memory is measured on every beat, by a probe the worker passes in."""

from __future__ import annotations

import json
from typing import Any

import pytest

from openmsk.heartbeat import Heartbeat


class _Pipeline:
    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set(self, key: str, value: str, px: int) -> None:
        self.store.setdefault("records", []).append((key, json.loads(value)))

    def sadd(self, key: str, member: str) -> None:
        pass

    def execute(self) -> None:
        pass


class _FakeRedis:
    """Just what :func:`openmsk.heartbeat.beat` calls: a pipeline with SET and SADD."""

    def __init__(self) -> None:
        self.store: dict[str, Any] = {}

    def pipeline(self) -> _Pipeline:
        return _Pipeline(self.store)

    def records(self) -> list[dict[str, Any]]:
        return [record for _key, record in self.store.get("records", [])]


def test_gpu_free_memory_is_measured_on_every_beat() -> None:
    client = _FakeRedis()
    readings = iter([8_000_000_000, 3_000_000_000])
    info = {"device": "cuda", "gpu": "Test GPU", "gpu_free_bytes": 9_000_000_000}
    heartbeat = Heartbeat(client, info, stale_s=30.0, gpu_free=lambda: next(readings))  # type: ignore[arg-type]
    heartbeat.beat_once()
    heartbeat.beat_once()
    first, second = client.records()
    assert first["gpu_free_bytes"] == 8_000_000_000
    assert second["gpu_free_bytes"] == 3_000_000_000  # the second call of the probe, not a snapshot
    assert second["gpu"] == "Test GPU" and second["id"] == heartbeat.ident
    assert info["gpu_free_bytes"] == 9_000_000_000  # the worker's info is not modified


def test_without_a_probe_the_record_is_the_workers_info() -> None:
    client = _FakeRedis()
    heartbeat = Heartbeat(client, {"device": "cpu", "gpu": None, "gpu_free_bytes": None}, stale_s=30.0)  # type: ignore[arg-type]
    heartbeat.beat_once()
    (record,) = client.records()
    assert record["device"] == "cpu" and record["gpu_free_bytes"] is None


def test_a_failing_probe_does_not_stop_the_beats(caplog: pytest.LogCaptureFixture) -> None:
    client = _FakeRedis()

    def broken() -> int:
        raise RuntimeError("CUDA error: device lost")

    heartbeat = Heartbeat(client, {"device": "cuda"}, stale_s=30.0, gpu_free=broken)  # type: ignore[arg-type]
    heartbeat.beat_once()
    (record,) = client.records()
    assert record["gpu_free_bytes"] is None
    assert "device lost" in caplog.text


def test_the_worker_probe_is_absent_on_cpu() -> None:
    from worker.device import gpu_free_bytes, gpu_free_probe

    assert gpu_free_probe("cpu") is None
    assert gpu_free_probe("cuda") is gpu_free_bytes
