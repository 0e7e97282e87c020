"""Several receiver processes on one SCP port (``OPENMSK_SCP_PROCESSES`` > 1).

One Python process serves C-STOREs at most as fast as its one GIL allows; with several concurrent associations
it is the CPU, not the disk, that limits it. So the receiving can run in N child processes, each a pynetdicom
AE of its own (:class:`ReceiverProcess`) listening on the same port with ``SO_REUSEPORT``: the kernel spreads
incoming connections over them. Everything that must exist once stays in the parent, the ``openmsk scp``
process (:class:`~scp.server.StorageSCP`): the completion tracker, the dispatcher and its outbox, the
forwarder, the retry timers, recovery at start.

What crosses between them, over one pipe per receiver (:class:`ReceiverPool` reads them all in one thread):

* every stored instance (its header, calling and called AE), sent **before** the C-STORE-RSP Success leaves
  the receiver — the file is durable by then — so nothing acknowledged is unknown to the parent; a receiver
  that cannot tell the parent answers Out of Resources instead;
* every ended association (released or not); association ids are ``(pid, n)``, unique across receivers.

A receiver ends when the parent tells it to or when the parent is gone (its pipe reaches end of file); it
ignores SIGTERM and SIGINT, which the parent handles for the process group. A receiver that dies is started
again (with a back-off if it keeps dying); its leftover files in ``incoming/.partial/`` (named with its pid)
are recovered or deleted, its open associations count as aborted, and the series on disk are re-evaluated as
at a start, which covers an instance written but not reported before the death (never acknowledged).

Per receiver, from the same settings: the calling-AE allowlist, TLS, the disk guard and the audit log (one
``write`` per line under a lock, safe for many processes). ``OPENMSK_SCP_MAX_ASSOCIATIONS`` stays a total:
the receivers count open associations in one shared array.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from pynetdicom.transport import ThreadedAssociationServer

from openmsk import audit
from openmsk.config import ConfigError, Settings
from scp.server import Receiver
from scp.storage import InstanceHeader

if TYPE_CHECKING:
    from scp.server import StorageSCP

LOG = logging.getLogger("openmsk.scp")

_SPAWN = multiprocessing.get_context("spawn")  # the parent has threads and Redis connections: no fork
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 6.0  # `openmsk up` SIGKILLs the group after 10 s
RESTART_DELAY_S = 0.5  # doubled for every death within STABLE_S of the start, up to MAX_RESTART_DELAY_S
MAX_RESTART_DELAY_S = 30.0
STABLE_S = 30.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, bound with ``SO_REUSEPORT`` so that several processes share a port."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with ``SO_REUSEPORT``: it holds the port for the
    receivers (and picks one when ``port`` is 0) while taking no connections itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# ------------------------------------------------------------------------------------------ in the receiver


class _TrackerLink:
    """The receiver's stand-in for the tracker: each call becomes one message to the parent."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()  # DUL threads of several associations send

    def _send(self, message: tuple) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except ValueError as exc:  # closed already (stopping)
                raise OSError(str(exc)) from None

    def instance_stored(
        self, association: int, header: InstanceHeader, calling_ae: str, called_ae: str
    ) -> None:
        """Raises ``OSError`` when the parent cannot be told (the C-STORE is then not acknowledged)."""
        self._send(("stored", association, header, calling_ae, called_ae))

    def association_ended(self, association: int, released: bool) -> None:
        with contextlib.suppress(OSError):
            self._send(("ended", association, released))


class ReceiverProcess(Receiver):
    """The AE of one receiver process: the handlers of :class:`~scp.server.Receiver`, reporting to the parent."""

    def __init__(
        self, settings: Settings, index: int, conn: Connection, slots: Any, fast_path: bool = True
    ) -> None:
        self._init_receiving(settings, fast_path)
        self._init_store()
        self.audit = audit.AuditLog(self.data_dir)
        self.tracker = _TrackerLink(conn)
        self.index = index
        self.slots = slots
        self._init_handlers()

    def _admit(self) -> bool:
        """One more association if all receivers together serve fewer than the maximum."""
        with self.slots.get_lock():
            counts = self.slots.get_obj()
            if sum(counts) >= self.settings.scp_max_associations:
                return False
            counts[self.index] += 1
            return True

    def _leave(self) -> None:
        with self.slots.get_lock():
            counts = self.slots.get_obj()
            counts[self.index] = max(0, counts[self.index] - 1)


def receiver_main(
    settings: Settings, index: int, port: int, conn: Connection, slots: Any, level: int, fast_path: bool
) -> None:
    """The body of a receiver process: listen on ``port`` until the parent says stop or is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles both for the process group
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(
        signal.SIG_UNBLOCK, _STOP_SIGNALS
    )  # blocked since the spawn: one pending is dropped
    logging.basicConfig(level=level, format=LOG_FORMAT.replace("%(name)s", f"%(name)s[receiver {index}]"))
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        receiver = ReceiverProcess(settings, index, conn, slots, fast_path)
        receiver.store.start()
        receiver.server = receiver._listen(port, ReusePortServer)
    except (OSError, ConfigError) as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        if message == ("stop",):
            break
    receiver.server.shutdown()  # aborts open associations (their end still goes to the parent)
    receiver.ae.shutdown()
    receiver.store.close()
    conn.close()


# -------------------------------------------------------------------------------------------- in the parent


@dataclass
class _Child:
    index: int
    process: Any
    conn: Connection | None
    started: float = field(default_factory=time.monotonic)
    ready: threading.Event = field(default_factory=threading.Event)
    failed: str | None = None
    open: set[tuple[int, int]] = field(default_factory=set)  # associations with instances, not yet ended


class ReceiverPool:
    """The parent's side: starts the receivers, relays their reports to the tracker, restarts the dead."""

    def __init__(self, scp: StorageSCP) -> None:
        self.scp = scp
        self.settings = scp.settings
        self.count = scp.settings.scp_processes
        self.slots = _SPAWN.Array("i", self.count)  # open associations per receiver
        self.port = scp.settings.scp_port
        self.restarts = 0
        self.cleanups = 0  # clean-ups after a dead receiver finished (for tests)
        self._reserved: socket.socket | None = None
        self._children: list[_Child | None] = [None] * self.count
        self._restart_due: dict[int, float] = {}
        self._delay = [RESTART_DELAY_S] * self.count
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start every receiver and wait until all listen; ``OSError`` if one cannot."""
        self._reserved = reserve_port(self.settings.scp_host, self.settings.scp_port)
        self.port = int(self._reserved.getsockname()[1])
        for index in range(self.count):
            self._spawn(index)
        self._thread = threading.Thread(target=self._run, name="scp-receivers", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        for child in list(self._children):
            assert child is not None
            if not child.ready.wait(max(0.0, deadline - time.monotonic())):
                raise OSError(f"receiver process {child.index} did not start within {READY_TIMEOUT_S:.0f} s")
            if child.failed:
                raise OSError(f"receiver process {child.index}: {child.failed}")

    def pids(self) -> list[int]:
        """The pids of the receivers now running (for tests and diagnostics)."""
        return [c.process.pid for c in self._children if c is not None and c.process.is_alive()]

    def _spawn(self, index: int) -> None:
        parent_end, child_end = _SPAWN.Pipe()
        process = _SPAWN.Process(
            target=receiver_main,
            args=(
                self.settings,
                index,
                self.port,
                child_end,
                self.slots,
                logging.getLogger().getEffectiveLevel(),
                self.scp.fast_path,
            ),
            name=f"openmsk-scp-receiver-{index}",
            daemon=True,
        )
        # Blocked in the spawning thread, so blocked in the child until it ignores them: a SIGTERM to the process
        # group (`openmsk up` stopping) must not kill a receiver while it imports; the parent stops it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        child_end.close()
        self._children[index] = _Child(index, process, parent_end)

    def _run(self) -> None:
        while True:
            children = [c for c in self._children if c is not None]
            if self._stopping and not children:
                return
            waitables: list[Any] = [c.conn for c in children if c.conn is not None]
            waitables += [c.process.sentinel for c in children]
            for ready in wait(waitables, timeout=0.2):
                child = next((c for c in children if ready is c.conn or ready == c.process.sentinel), None)
                if child is None:
                    continue
                if ready is child.conn:
                    self._drain(child)
                elif not child.process.is_alive():
                    self._ended(child)
            now = time.monotonic()
            for index, due in list(self._restart_due.items()):
                if due <= now and not self._stopping:
                    del self._restart_due[index]
                    self._spawn(index)
                    self.restarts += 1

    def _drain(self, child: _Child) -> None:
        """Handle every message the child has written so far."""
        conn = child.conn
        while conn is not None:
            try:
                if not conn.poll():
                    return
                message = conn.recv()
            except (EOFError, OSError):
                conn.close()
                child.conn = None
                return
            self._handle(child, message)

    def _handle(self, child: _Child, message: tuple) -> None:
        kind = message[0]
        tracker = self.scp.tracker
        if kind == "stored":
            _, ident, header, calling, called = message
            key = (child.process.pid, ident)
            child.open.add(key)
            tracker.instance_stored(key, header, calling, called)
        elif kind == "ended":
            _, ident, released = message
            key = (child.process.pid, ident)
            child.open.discard(key)
            tracker.association_ended(key, released)
        elif kind == "ready":
            child.ready.set()
        elif kind == "failed":
            child.failed = message[1]
            LOG.error("receiver process %d cannot start: %s", child.index, message[1])
            child.ready.set()

    def _ended(self, child: _Child) -> None:
        """A receiver exited: account for what it did, then start it again unless the SCP is stopping."""
        self._drain(child)  # what it wrote before it died is still in the pipe
        if child.conn is not None:
            child.conn.close()
        self._children[child.index] = None
        for key in child.open:
            self.scp.tracker.association_ended(key, False)
        with self.slots.get_lock():
            self.slots.get_obj()[child.index] = 0
        if not child.ready.is_set():
            child.failed = f"exited with code {child.process.exitcode} before it listened"
        child.ready.set()
        if self._stopping:
            return
        pid, code = child.process.pid, child.process.exitcode
        lived = time.monotonic() - child.started
        self._delay[child.index] = (
            RESTART_DELAY_S if lived > STABLE_S else min(MAX_RESTART_DELAY_S, 2 * self._delay[child.index])
        )
        delay = self._delay[child.index]
        LOG.error(
            "receiver process %d (pid %d) exited with code %s after %.0f s; restarted in %.1f s",
            child.index,
            pid,
            code,
            lived,
            delay,
        )
        # In a thread of its own: a large incoming/ takes a while to scan, and the relay must go on meanwhile.
        threading.Thread(
            target=self._clean_up, args=(child.index, pid), name="scp-receiver-cleanup", daemon=True
        ).start()
        self._restart_due[child.index] = time.monotonic() + delay

    def _clean_up(self, index: int, pid: int) -> None:
        """After a receiver died: its ``.partial/`` files, then the series on disk, as at a start."""
        try:
            recovered, deleted = self.scp.store.recover_partial(pid)
            restored = self.scp._restore_pending()
        except OSError as exc:
            LOG.error("cannot clean up after receiver %d: %s", index, exc)
            return
        self.cleanups += 1
        LOG.info(
            "after receiver %d: %d instance(s) moved into place, %d unfinished file(s) removed, %d series "
            "re-evaluated",
            index,
            recovered,
            deleted,
            restored,
        )

    def stop(self) -> None:
        """Tell every receiver to stop, wait for them (their last reports are relayed), then stop relaying."""
        self._stopping = True
        self._restart_due.clear()
        children = [c for c in self._children if c is not None]
        for child in children:
            if child.conn is not None:
                with contextlib.suppress(OSError, ValueError):
                    child.conn.send(("stop",))
        # The relay thread reaps them (one thread only waits for children) and ends when all are gone.
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                for child in list(self._children):
                    if child is not None:
                        LOG.warning("receiver process %d did not stop; killed", child.index)
                        with contextlib.suppress(OSError):
                            child.process.kill()
                self._thread.join(5)
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
