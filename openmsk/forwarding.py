"""Forwarding received images to the archive — the record every room shares.

A node that a scanner sends to directly is the study's first hop: the images must reach the archive (Orthanc,
a PACS) as well as the results, and the results must not arrive before their images. The SCP and the web write a
:class:`ForwardOrder` per series into an on-disk outbox (``DATA_DIR/forward/``, atomic and fsync'd) before the
series is marked evaluated; the forwarder (``forwarder/``) sends the instances as received and records per
destination a :class:`ForwardState` in Redis, which the worker reads before it delivers results there and the
web shows on the job page and in ``/metrics``.

An order is removed from the outbox only when every destination has the images, so neither a crash nor an
archive that is down loses a series; Redis only mirrors the state (the outbox is the truth).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Literal

import redis
from pydantic import BaseModel, Field

from openmsk.spool import RecordFolder

OUTBOX = "forward"
STATE_PREFIX = "openmsk:forward:"  # + series UID: hash destination -> ForwardState JSON
COUNTERS = "openmsk:forward-counters"  # hash: instances_sent, orders_done, send_failures
STATE_TTL_S = 30 * 24 * 3600

Status = Literal["pending", "retrying", "done", "skipped", "failed"]


def instances_digest(sop_uids: list[str]) -> str:
    """SHA-256 over the sorted SOP Instance UIDs: which set of instances a state or job is about."""
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()


class ForwardOrder(BaseModel):
    """Send these instances of one series, as received, to these destinations."""

    study_uid: str
    series_uid: str
    folder: str = Field(description="folder of the instances, relative to DATA_DIR")
    files: dict[str, str] = Field(description="SOP Instance UID -> file name in the folder")
    destinations: list[str]
    source: Literal["scp", "upload"] = "scp"
    created_at: float = Field(default_factory=time.time)

    @property
    def id(self) -> str:
        """One order per series and set of instances: a resend of the same series is the same order."""
        return hashlib.sha256(f"{self.series_uid}\n{self.digest}".encode()).hexdigest()[:32]

    @property
    def digest(self) -> str:
        return instances_digest(list(self.files))


class ForwardState(BaseModel):
    """Where one series stands with one destination. ``skipped``: it came from there or was there already."""

    status: Status = "pending"
    digest: str = Field("", description="instances_digest of the instances this state is about")
    total: int = 0
    sent: int = 0
    attempts: int = 0
    last_error: str = ""
    next_attempt_at: float | None = None
    updated_at: float = Field(default_factory=time.time)

    @property
    def arrived(self) -> bool:
        """The images are at the destination (sent now, or there before)."""
        return self.status in ("done", "skipped")


class ForwardOutbox:
    """Orders waiting to be forwarded, one JSON file each under ``DATA_DIR/forward/``."""

    def __init__(self, data_dir: Path) -> None:
        self.records = RecordFolder(data_dir / OUTBOX, ForwardOrder)
        self.root = self.records.root

    def put(self, order: ForwardOrder) -> ForwardOrder:
        """Record an order durably; an order with the same id (same series, same instances) is kept once."""
        self.records.write(order.id, order)
        return order

    def orders(self) -> list[ForwardOrder]:
        """Waiting orders, oldest first (an unreadable file is moved aside, not retried forever)."""
        return self.records.read_all()

    def remove(self, order: ForwardOrder) -> None:
        self.records.delete(order.id)

    def __len__(self) -> int:
        return len(self.records)


class ForwardStates:
    """The per-destination forwarding state of each series, in Redis (written by the forwarder only)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def set(self, series_uid: str, destination: str, state: ForwardState) -> None:
        key = STATE_PREFIX + series_uid
        with self.redis.pipeline() as pipe:
            pipe.hset(key, destination, state.model_dump_json())
            pipe.expire(key, STATE_TTL_S)
            pipe.execute()

    def get(self, series_uid: str) -> dict[str, ForwardState]:
        raw = self.redis.hgetall(STATE_PREFIX + series_uid)
        return {name.decode(): ForwardState.model_validate_json(value) for name, value in raw.items()}

    def count(self, name: str, amount: int = 1) -> None:
        self.redis.hincrby(COUNTERS, name, amount)

    def counters(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(COUNTERS).items()}

    def waiting(self) -> dict[str, dict[str, int]]:
        """Per destination, how many series are in each unfinished status (for ``/metrics``)."""
        summary: dict[str, dict[str, int]] = {}
        for key in self.redis.scan_iter(match=STATE_PREFIX + "*", count=500):
            for name, value in self.redis.hgetall(key).items():
                status = json.loads(value).get("status", "pending")
                if status in ("pending", "retrying", "failed"):
                    per = summary.setdefault(name.decode(), {})
                    per[status] = per.get(status, 0) + 1
        return summary
