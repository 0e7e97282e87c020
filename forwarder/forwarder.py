"""The forwarder: drains the archive outbox, one series and destination at a time, with backoff.

It runs as a thread of the SCP and of the web server (uploads); the two take turns on the outbox (a file lock).

For each order and destination it asks the destination which instances of the series it has already
(:meth:`~destinations.base.Destination.present`), sends only the others exactly as they were received, checks
they arrived, and records the outcome as a :class:`~openmsk.forwarding.ForwardState` (in memory, mirrored to
Redis for the worker, the job page and ``/metrics``). A destination that is down is retried with backoff
(:data:`BACKOFF_S`, then every :data:`RETRY_FOREVER_S`): after the backoff the state says ``failed`` (so jobs
waiting for those images fail with ARCHIVE_FAILED instead of hanging) but the order stays in the outbox and is
still retried, so the images reach the archive when it returns. An order leaves the outbox only when every
destination has its images, or when its files are gone (retention removed them).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from destinations import DeliveryError, Destination
from openmsk.forwarding import ForwardOrder, ForwardOutbox, ForwardState, ForwardStates

LOG = logging.getLogger("openmsk.forwarder")

BACKOFF_S = (2, 5, 10, 30, 60, 120, 300)  # seconds before attempt 2, 3, ...; then "failed", retried still
RETRY_FOREVER_S = 300
IDLE_POLL_S = 5.0  # how often the outbox is re-read when nothing woke the thread (orders from the web)
LOCKED_POLL_S = 1.0  # another process holds the outbox: look again this soon
PROGRESS_EVERY = 16  # instances between progress updates in Redis


class Forwarder:
    """Sends the orders of ``DATA_DIR/forward/`` to their destinations on a thread of its own."""

    def __init__(
        self,
        data_dir: Path,
        destinations: Mapping[str, Destination],
        redis_url: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = data_dir
        self.outbox = ForwardOutbox(data_dir)
        self.destinations = destinations
        self.clock = clock
        self.states: dict[str, dict[str, ForwardState]] = {}  # order id -> destination -> state
        self._gone: set[str] = set()  # order ids whose files are no longer on disk
        client = (
            redis.Redis.from_url(
                redis_url, socket_connect_timeout=2, socket_timeout=5, retry=Retry(NoBackoff(), 0)
            )
            if redis_url
            else None
        )
        self.mirror = ForwardStates(client) if client is not None else None
        self._mirror_down = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------------- orders

    def came_from(self, destination: str, calling_ae: str) -> bool:
        """True when a series sent by ``calling_ae`` came from ``destination`` (it is not sent back there)."""
        found = self.destinations.get(destination)
        return bool(calling_ae) and found is not None and found.is_origin(calling_ae)

    def submit(self, order: ForwardOrder) -> ForwardOrder:
        """Record an order durably (before the caller marks the series evaluated) and wake the thread."""
        self.outbox.put(order)
        for name in order.destinations:
            self._record(order, name, ForwardState(digest=order.digest, total=len(order.files)))
        self._wake.set()
        return order

    def run_once(self) -> float:
        """One pass over the outbox: every order whose attempt is due is tried. Returns seconds until the
        next attempt is due (``IDLE_POLL_S`` when nothing is waiting).

        The SCP and the web both run a forwarder on the same outbox; an exclusive lock on the outbox lets one
        pass run at a time (the other process tries again later), so no order is sent twice at once.
        """
        with open(self.outbox.root / ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return LOCKED_POLL_S
            return self._pass()

    def _pass(self) -> float:
        now = self.clock()
        next_due = now + IDLE_POLL_S
        for order in self.outbox.orders():
            states = self.states.setdefault(order.id, {})
            for name in order.destinations:
                state = states.get(name) or ForwardState(digest=order.digest, total=len(order.files))
                if state.arrived or (order.id in self._gone):
                    continue
                if state.next_attempt_at is not None and state.next_attempt_at > now:
                    next_due = min(next_due, state.next_attempt_at)
                    continue
                state = self._forward(order, name, state)
                if state.next_attempt_at is not None:
                    next_due = min(next_due, state.next_attempt_at)
                if self._stop.is_set():
                    return 0.0
            finished = all(n in states and states[n].arrived for n in order.destinations)
            if finished or order.id in self._gone:
                self.outbox.remove(order)
                self.states.pop(order.id, None)
                self._gone.discard(order.id)
                self._count("orders_done")
        return max(0.0, next_due - self.clock())

    def _forward(self, order: ForwardOrder, name: str, state: ForwardState) -> ForwardState:
        folder = self.data_dir / order.folder
        paths = {uid: folder / filename for uid, filename in order.files.items()}
        missing_files = [uid for uid, path in paths.items() if not path.is_file()]
        if missing_files:
            self._gone.add(order.id)
            LOG.error(
                "series %s: %d instance file(s) are gone; not forwarded", order.series_uid, len(missing_files)
            )
            return self._record(
                order,
                name,
                state.model_copy(
                    update={
                        "status": "failed",
                        "last_error": f"{len(missing_files)} instance file(s) are no longer on the node",
                        "next_attempt_at": None,
                    }
                ),
            )
        attempts = state.attempts + 1
        try:
            destination = self.destinations.get(name)
            if destination is None:
                raise DeliveryError(f"destination {name!r} is not configured")
            there = destination.present(order.study_uid, order.series_uid)
            to_send = [paths[uid] for uid in sorted(paths) if there is None or uid not in there]
            if not to_send:
                LOG.info("series %s: already at %s; nothing to forward", order.series_uid, name)
                return self._record(
                    order,
                    name,
                    ForwardState(
                        status="skipped", digest=order.digest, total=len(paths), sent=0, attempts=attempts
                    ),
                )
            progress = state.model_copy(update={"status": "pending", "attempts": attempts, "sent": 0})
            already = len(paths) - len(to_send)

            def on_sent(count: int) -> None:
                if count % PROGRESS_EVERY == 0:
                    self._record(order, name, progress.model_copy(update={"sent": already + count}))

            destination.forward(to_send, on_sent)
            self._count("instances_sent", len(to_send))
            if there is not None:
                after = destination.present(order.study_uid, order.series_uid) or set()
                lost = [uid for uid in paths if uid not in after]
                if lost:
                    raise DeliveryError(
                        f"{len(lost)} instance(s) accepted but not found at {name} afterwards"
                    )
            LOG.info("series %s: %d instance(s) forwarded to %s", order.series_uid, len(to_send), name)
            return self._record(
                order,
                name,
                ForwardState(
                    status="done", digest=order.digest, total=len(paths), sent=len(paths), attempts=attempts
                ),
            )
        except Exception as exc:  # a destination's library may raise anything; the order must survive it
            self._count("send_failures")
            spent = attempts > len(BACKOFF_S)
            delay = RETRY_FOREVER_S if spent else BACKOFF_S[attempts - 1]
            LOG.warning(
                "series %s: forwarding to %s failed (attempt %d, next in %d s): %s",
                order.series_uid,
                name,
                attempts,
                delay,
                type(exc).__name__ if not isinstance(exc, DeliveryError) else exc,
            )
            return self._record(
                order,
                name,
                state.model_copy(
                    update={
                        "status": "failed" if spent else "retrying",
                        "attempts": attempts,
                        "last_error": str(exc) or type(exc).__name__,
                        "next_attempt_at": self.clock() + delay,
                    }
                ),
            )

    # ----------------------------------------------------------------------------------------------- state

    def _record(self, order: ForwardOrder, name: str, state: ForwardState) -> ForwardState:
        state = state.model_copy(update={"updated_at": self.clock()})
        self.states.setdefault(order.id, {})[name] = state
        if self.mirror is not None:
            try:
                self.mirror.set(order.series_uid, name, state)
                self._mirror_down = False
            except (redis.RedisError, OSError) as exc:
                if not self._mirror_down:
                    LOG.warning("Redis unreachable (%s): forwarding state not mirrored", type(exc).__name__)
                self._mirror_down = True
        return state

    def _count(self, name: str, amount: int = 1) -> None:
        if self.mirror is None:
            return
        with contextlib.suppress(redis.RedisError, OSError):  # best effort; the outbox is the truth
            self.mirror.count(name, amount)

    # -------------------------------------------------------------------------------------------- thread

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> Forwarder:
        self._thread = threading.Thread(target=self._run, name="forwarder", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.run_once()
            except Exception:
                LOG.exception("forwarding pass failed")
                wait = IDLE_POLL_S
            self._wake.wait(wait)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.mirror is not None:
            self.mirror.redis.close()
