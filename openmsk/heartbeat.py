"""Worker heartbeats in Redis: how the rest of the node knows a worker is alive, and what device it has.

A worker writes its record every few seconds; a reader counts a worker as alive only if its record is younger
than ``stale_s``. Redis answering says nothing about workers — that was the seed service's mistake.

Free GPU memory is measured on every beat by a probe the worker passes in (``gpu_free``), so this module, read
by the web as well, never imports torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger("openmsk.worker")

KEY_PREFIX = "openmsk:worker:"
# Ids of workers that have beaten; readers look up only these keys instead of scanning the keyspace.
MEMBERS = "openmsk:workers"
INTERVAL_S = 5.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def beat(client: redis.Redis, ident: str, info: dict[str, Any], ttl_s: float) -> None:
    """Write one heartbeat; the key expires on its own so dead workers leave nothing behind."""
    record = {**info, "id": ident, "ts": time.time()}
    with client.pipeline() as pipe:
        pipe.set(KEY_PREFIX + ident, json.dumps(record), px=int(ttl_s * 2000))
        pipe.sadd(MEMBERS, ident)
        pipe.execute()


def remove(client: redis.Redis, ident: str) -> None:
    with client.pipeline() as pipe:
        pipe.delete(KEY_PREFIX + ident)
        pipe.srem(MEMBERS, ident)
        pipe.execute()


def live_workers(client: redis.Redis, stale_s: float) -> list[dict[str, Any]]:
    """Records of workers whose last heartbeat is younger than ``stale_s`` seconds, sorted by id."""
    now = time.time()
    idents = sorted(i.decode() for i in client.smembers(MEMBERS))
    raws = client.mget([KEY_PREFIX + i for i in idents]) if idents else []
    gone = [ident for ident, raw in zip(idents, raws, strict=True) if raw is None]
    if gone:
        client.srem(MEMBERS, *gone)  # their keys expired: the workers died without saying goodbye
    records = [json.loads(raw) for raw in raws if raw]
    return [r for r in records if now - r.get("ts", 0) < stale_s]


class Heartbeat:
    """A daemon thread that beats every :data:`INTERVAL_S` until stopped."""

    def __init__(
        self,
        client: redis.Redis,
        info: dict[str, Any],
        stale_s: float,
        gpu_free: Callable[[], int | None] | None = None,
    ) -> None:
        """*gpu_free*, when given, is called on every beat: its answer is the record's ``gpu_free_bytes``."""
        self.client, self.info, self.stale_s = client, info, stale_s
        self.gpu_free = gpu_free
        self.ident = worker_id()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openmsk-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            remove(self.client, self.ident)

    def record(self) -> dict[str, Any]:
        """What one beat writes: the worker's info, with free GPU memory measured now when there is a probe."""
        if self.gpu_free is None:
            return self.info
        try:
            free = self.gpu_free()
        except Exception as exc:  # a failing probe must not stop the beats: the worker would look dead
            log.warning("GPU free memory not measured: %s", exc)
            free = None
        return {**self.info, "gpu_free_bytes": free}

    def beat_once(self) -> None:
        # Redis down: the worker simply looks stale until it is back.
        with contextlib.suppress(redis.RedisError):
            beat(self.client, self.ident, self.record(), self.stale_s)

    def _run(self) -> None:
        interval = min(INTERVAL_S, self.stale_s / 3)
        while not self._stop.is_set():
            self.beat_once()
            self._stop.wait(interval)
