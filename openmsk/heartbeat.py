"""Worker heartbeats in Redis: how the rest of the node knows a worker is alive, and what device it has.

A worker writes its record every few seconds; a reader counts a worker as alive only if its record is younger
than ``stale_s``. Redis answering says nothing about workers — that was the seed service's mistake.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

import redis

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

    def __init__(self, client: redis.Redis, info: dict[str, Any], stale_s: float) -> None:
        self.client, self.info, self.stale_s = client, info, stale_s
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

    def _run(self) -> None:
        interval = min(INTERVAL_S, self.stale_s / 3)
        while not self._stop.is_set():
            # Redis down: the worker simply looks stale until it is back.
            with contextlib.suppress(redis.RedisError):
                beat(self.client, self.ident, self.info, self.stale_s)
            self._stop.wait(interval)
