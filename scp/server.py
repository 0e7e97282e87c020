"""The Storage SCP: a pynetdicom AE that stores what it receives and tells the tracker and dispatcher.

One :class:`StorageSCP` owns everything that runs in the ``openmsk scp`` process: the AE (Verification and
Storage for every storage SOP class in every transfer syntax pynetdicom can negotiate), the instance store,
the completion tracker with its thread, the dispatcher with its outbox thread, and the forwarder that sends
the received images on to the archive destinations. The event handlers are methods (of :class:`Receiver`)
named after the pynetdicom events they serve. With ``OPENMSK_SCP_PROCESSES`` > 1 the AE and its handlers run
in receiver processes instead, one :class:`Receiver` each, reporting to this process (:mod:`scp.receivers`).

A C-STORE is answered "success" only once the instance is durably on disk (:mod:`scp.storage`). Bad input
gets a failure status with an Error Comment and never stops the association or the SCP. Patient data stays out
of the logs: they name UIDs, AE titles, addresses and counts only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import Verification

from destinations import load_destinations
from forwarder import Forwarder
from openmsk import audit
from openmsk.config import ConfigError, Settings, env_name
from openmsk.objectstore import store_for
from scp import fastpath
from scp.completion import CompletionTracker, PendingSeries
from scp.dispatch import Dispatcher, DispatchResult
from scp.routing import RoutingError, RoutingRules, resolve_default_model
from scp.security import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    REJECT_NO_SPACE,
    DiskGuard,
    parse_allowlist,
    tls_context,
)
from scp.storage import (
    IMPLEMENTATION_VERSION_NAME,
    SUFFIX,
    InstanceHeader,
    InstanceStore,
    InvalidInstance,
    file_meta,
    read_file_meta,
    read_header,
)

LOG = logging.getLogger("openmsk.scp")

# C-STORE statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

MAX_PDU = 1 << 20  # what the SCP announces it can receive; dcmtk sends at most 128 kB PDUs anyway
COMPLETION_POLL_S = 1.0
DISPATCH_RETRY_S = 10.0  # a series whose dispatch failed (disk error, bug) is tried again this often


def failure(status: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (LO: at most 64 characters)."""
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]
    return response


@dataclass
class AssociationStats:
    """Per-association state and counters, logged when it ends."""

    ident: int
    address: str
    calling_ae: str = ""
    accepted: bool = True
    admitted: bool = False  # counted by Receiver._admit (released by _leave when it ends)
    release_requested: bool = False
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    bytes: int = 0
    series: set[str] = field(default_factory=set)


class Receiver:
    """The receiving half of the SCP: the AE, its event handlers and the instance store.

    It reports every stored instance and every ended association to ``self.tracker`` (a
    :class:`CompletionTracker`, or in a receiver process of :mod:`scp.receivers` a link to the parent's).
    :class:`StorageSCP` is one, with everything else of the node's SCP around it.
    """

    settings: Settings
    tracker: Any

    def _init_receiving(self, settings: Settings, fast_path: bool) -> None:
        self.settings = settings
        self.fast_path = fast_path  # False: all through pynetdicom's stock path (the tests compare both)
        self.data_dir = settings.data_path
        self.allowlist = parse_allowlist(settings.scp_allowed_calling_aes)
        self.tls = tls_context(settings)

    def _init_store(self) -> None:
        self.disk = DiskGuard(self.data_dir, self.settings.min_free_disk_mb)
        self.store = InstanceStore(self.data_dir)

    def _init_handlers(self) -> None:
        self.ae = self._make_ae()
        self.server: Any = None
        self._associations: dict[int, AssociationStats] = {}
        self._next_id = 0
        self._lock = threading.Lock()

    def _admit(self) -> bool:
        """Room for one more association? pynetdicom counts those of this process; receivers share a total."""
        return True

    def _leave(self) -> None:
        """An association :meth:`_admit` let in is over."""

    def _listen(self, port: int, server_class: Any = None) -> Any:
        """Start pynetdicom's threaded server on ``port`` with this object's handlers; returns the server."""
        handlers = [
            (evt.EVT_CONN_OPEN, self.handle_conn_open),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACSE_RECV, self.handle_acse_recv),
            (evt.EVT_CONN_CLOSE, self.handle_conn_close),
        ]
        address = (self.settings.scp_host, port)
        if server_class is None:
            return self.ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=self.tls)
        server = self.ae.make_server(
            address, evt_handlers=handlers, ssl_context=self.tls, server_class=server_class
        )
        thread = threading.Thread(target=server.serve_forever, name="scp-acceptor", daemon=True)
        thread.start()
        self.ae._servers.append(server)  # so that ae.shutdown() stops it, as with start_server()
        return server

    def _make_ae(self) -> AE:
        _config.LOG_HANDLER_LEVEL = "none"  # pynetdicom's per-message debug handlers cost ~1 ms per instance
        fastpath.install()
        ae = AE(ae_title=self.settings.scp_ae_title)
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ae.require_called_aet = True
        ae.maximum_associations = self.settings.scp_max_associations
        ae.maximum_pdu_size = MAX_PDU
        ae.network_timeout = self.settings.scp_network_timeout_s
        ae.acse_timeout = 30
        ae.dimse_timeout = self.settings.scp_network_timeout_s
        return ae

    # ------------------------------------------------------------------------------------ event handlers

    def handle_conn_open(self, event: evt.Event) -> None:
        """A TCP connection: start its bookkeeping, tune the socket, wire the association's fast path."""
        assoc = event.assoc
        with self._lock:
            self._next_id += 1
            stats = AssociationStats(self._next_id, str(event.address[0]))
            assoc._openmsk_stats = stats
            self._associations[stats.ident] = stats
        raw = getattr(assoc.dul.socket, "socket", None)
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.fast_path:
            fastpath.accelerate(assoc, self.store_fast)

    def handle_requested(self, event: evt.Event) -> None:
        """An A-ASSOCIATE-RQ: check the allowlist and the disk before pynetdicom negotiates."""
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        called = assoc.requestor.primitive.called_ae_title.strip()
        address = assoc.requestor.address
        stats = _stats(assoc)
        stats.calling_ae = calling
        stats.accepted = False
        if called != self.settings.scp_ae_title:
            LOG.warning(
                "rejected %s from %s: called AE %r is not %s", calling, address, called, self.ae.ae_title
            )
            self._audit_association(calling, called, address, "called-ae")
            reject(assoc, REJECT_CALLED_AE)
            return
        if not self.allowlist.permits(calling, address):
            LOG.warning("rejected %s from %s: calling AE/address not in the allowlist", calling, address)
            self._audit_association(calling, called, address, "calling-ae")
            reject(assoc, REJECT_CALLING_AE)
            return
        if not self.disk.has_room():
            LOG.error(
                "rejected %s from %s: free disk space below %d MB",
                calling,
                address,
                self.settings.min_free_disk_mb,
            )
            self._audit_association(calling, called, address, "no-space")
            reject(assoc, REJECT_NO_SPACE)
            return
        if not self._admit():
            LOG.warning(
                "rejected %s from %s: %d associations open (OPENMSK_SCP_MAX_ASSOCIATIONS)",
                calling,
                address,
                self.settings.scp_max_associations,
            )
            self._audit_association(calling, called, address, "association-limit")
            reject(assoc, REJECT_LOCAL_LIMIT)
            return
        stats.admitted = True
        stats.accepted = True
        self._audit_association(calling, called, address, None)

    def _audit_association(
        self, calling: str, called: str, address: str, rejected: audit.RejectReason | None
    ) -> None:
        audit.association(
            self.audit, calling_ae=calling, called_ae=called, address=address, rejected=rejected
        )

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int | Dataset:
        """A C-STORE that pynetdicom delivered (the fast path serves most in :meth:`store_fast`)."""
        request = event.request
        raw = request.DataSet.getbuffer() if request.DataSet is not None else memoryview(b"")
        try:
            status, comment = self.store_instance(
                event.assoc,
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                event.context.transfer_syntax,
                raw,
            )
        finally:
            raw.release()
        return SUCCESS if status == SUCCESS else failure(status, comment or "")

    def store_fast(
        self, assoc: Any, request: fastpath.StoreRequest, dataset: bytes, after: list[Callable[[], object]]
    ) -> tuple[int, str | None]:
        """A C-STORE served by the fast path in the DUL thread (see :mod:`scp.fastpath`); the move of the
        durable instance into its series folder goes into *after*, run once the response is sent."""
        return self.store_instance(
            assoc, request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax, dataset, after
        )

    def store_instance(
        self,
        assoc: Any,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        raw: bytes | memoryview,
        after: list[Callable[[], object]] | None = None,
    ) -> tuple[int, str | None]:
        """Check one received data set, write it durably, tell the tracker; returns (status, error comment).

        The data set is never decoded: :func:`~scp.storage.read_header` walks it once for completeness and
        the few attributes needed, and the bytes are written as they came. With *after*, a Success leaves
        the renames into the series folder (:meth:`~scp.storage.PendingWrite.finish`) in it, for the
        caller to run once the response is on its way: the instance is durable before Success either way.
        """
        stats = _stats(assoc)
        try:
            header = read_header(raw, transfer_syntax)
            if header.sop_class_uid != sop_class_uid:
                return self._refuse(
                    stats, DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the request"
                )
            if header.sop_instance_uid != sop_instance_uid:
                return self._refuse(stats, CANNOT_UNDERSTAND, "SOPInstanceUID differs from the request")
            if not self.disk.has_room():
                return self._refuse(stats, OUT_OF_RESOURCES, "out of disk space")
            calling = assoc.requestor.ae_title.strip()
            called = assoc.acceptor.ae_title.strip()
            meta = file_meta(header.sop_class_uid, header.sop_instance_uid, transfer_syntax, calling, called)
            if after is None:
                self.store.write(header, [meta, raw])
                pending = None
            else:
                pending = self.store.write_durable(header, [meta, raw])
        except InvalidInstance as exc:
            return self._refuse(stats, CANNOT_UNDERSTAND, str(exc))
        except OSError as exc:
            LOG.error("cannot store an instance: %s", exc.strerror or exc)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            return self._refuse(
                stats, OUT_OF_RESOURCES, "out of disk space" if full else "cannot write to disk"
            )
        try:  # before Success: nothing acknowledged is unknown to the tracker
            self.tracker.instance_stored(stats.ident, header, calling, called)
        except OSError:  # a receiver process whose parent is gone: the file waits for the next start
            if pending is not None:
                pending.discard()  # refused: not kept
            return self._refuse(stats, OUT_OF_RESOURCES, "the SCP is restarting")
        if pending is not None and after is not None:
            after.append(pending.finish)
        stats.stored += 1
        stats.bytes += len(raw)
        stats.series.add(header.series_uid)
        return SUCCESS, None

    def _refuse(self, stats: AssociationStats, status: int, comment: str) -> tuple[int, str]:
        stats.failed += 1
        LOG.warning("refused an instance from %s: 0x%04X %s", stats.calling_ae, status, comment)
        return status, comment

    def handle_acse_recv(self, event: evt.Event) -> None:
        """Note an A-RELEASE request: it comes before the connection closes, whichever thread runs first."""
        primitive = event.primitive
        if isinstance(primitive, A_RELEASE) and primitive.result is None:
            _stats(event.assoc).release_requested = True

    def handle_conn_close(self, event: evt.Event) -> None:
        """The connection is gone: the association ended, released (the peer asked) or aborted/dropped."""
        assoc = event.assoc
        stats = _stats(assoc)
        with self._lock:
            if self._associations.pop(stats.ident, None) is None:
                return  # reported already
        released = stats.release_requested and not assoc.is_aborted
        if stats.admitted:
            self._leave()
        self.tracker.association_ended(stats.ident, released)
        if not stats.accepted:
            return
        seconds = time.monotonic() - stats.started
        LOG.info(
            "association from %s (%s) %s after %.1f s: %d stored, %d refused, %d series, %.1f MB",
            stats.calling_ae,
            stats.address,
            "released" if released else "aborted",
            seconds,
            stats.stored,
            stats.failed,
            len(stats.series),
            stats.bytes / 1e6,
        )


class StorageSCP(Receiver):
    """The node's DICOM receiver. ``start()`` binds and returns; ``stop()`` shuts everything down in order.

    With ``OPENMSK_SCP_PROCESSES`` above 1 the receiving runs in that many child processes on the same port
    (:mod:`scp.receivers`); this object keeps the tracker, dispatcher, forwarder and timers, fed by them.
    """

    def __init__(self, settings: Settings, rules: RoutingRules | None = None, fast_path: bool = True) -> None:
        if settings.series_timeout_s < settings.series_quiet_s:
            raise ConfigError(
                f"{env_name('series_timeout_s')}={settings.series_timeout_s} is invalid: expected "
                f"{Settings.model_fields['series_timeout_s'].description}"
            )
        if not settings.redis_url:
            raise ConfigError(f"{env_name('redis_url')} is unset: the SCP queues jobs in Redis")
        self._init_receiving(settings, fast_path)
        self.rules = rules if rules is not None else load_rules(settings)
        self._init_store()
        self.tracker = CompletionTracker(settings.series_quiet_s, settings.series_timeout_s)
        try:
            destinations = load_destinations(settings)
        except ValueError as exc:
            raise ConfigError(f"{env_name('destinations')}: {exc}") from None
        self.forwarder = Forwarder(self.data_dir, destinations, settings.redis_url)
        self.dispatcher = Dispatcher(
            self.data_dir,
            self.store,
            self.rules,
            settings.redis_url,
            forwarder=self.forwarder,
            archive_default=["orthanc"] if "orthanc" in destinations else [],
            objects=store_for(settings),
        )
        self.audit = audit.AuditLog(self.data_dir)
        self.dispatcher.jobs.audit = self.audit  # job-created lines of SCP jobs go to this node's audit log
        self._retry_dispatch: dict[str, tuple[PendingSeries, float]] = {}  # series UID -> (series, due)
        self._init_handlers()
        self.pool: Any = None  # the receiver processes (scp.receivers.ReceiverPool) when there are several
        self._stopping = threading.Event()
        self._completion_thread: threading.Thread | None = None
        self.completed: list[DispatchResult] = []  # recent dispatch results (for tests and the benchmark)

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> StorageSCP:
        """Recover what a previous run left, then listen. Raises ``OSError`` if the port cannot be bound."""
        recovered, deleted = self.store.recover_partial()
        if recovered or deleted:
            LOG.info(
                "after an unclean stop: %d instance(s) moved into place, %d unfinished file(s) removed",
                recovered,
                deleted,
            )
        processes = self.settings.scp_processes
        if processes == 1:
            self.store.start()
        restored = self._restore_pending()
        self.dispatcher.start()
        self.forwarder.start()
        self._completion_thread = threading.Thread(
            target=self._complete_series, name="scp-completion", daemon=True
        )
        self._completion_thread.start()
        if processes == 1:
            self.server = self._listen(self.settings.scp_port)
        else:
            from scp.receivers import ReceiverPool

            self.pool = ReceiverPool(self)
            try:
                self.pool.start()
            except OSError:
                self.stop()
                raise
        LOG.info(
            "SCP %s listening on %s:%d%s%s%s; %d series from an earlier run re-evaluated",
            self.settings.scp_ae_title,
            self.settings.scp_host,
            self.port,
            f" ({processes} receiver processes)" if processes > 1 else "",
            " (TLS)" if self.tls else "",
            f", {len(self.allowlist.entries)} allowed calling AE(s)" if self.allowlist.enabled else "",
            restored,
        )
        return self

    @property
    def port(self) -> int:
        if self.pool is not None:
            return self.pool.port
        return int(self.server.server_address[1]) if self.server else self.settings.scp_port

    def stop(self) -> None:
        """Stop listening, end open associations, let pending series wait for the next start, stop threads."""
        self._stopping.set()
        if self.pool is not None:
            self.pool.stop()  # the receivers first: what they stored is reported before the rest stops
        if self.server is not None:
            self.server.shutdown()  # also aborts the associations it spawned
            self.server = None
        self.ae.shutdown()
        self.tracker.wake()
        if self._completion_thread is not None:
            self._completion_thread.join(timeout=5)
        self.forwarder.stop()
        self.dispatcher.stop()
        self.store.close()
        LOG.info("SCP stopped")

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ completion

    def _complete_series(self) -> None:
        while not self._stopping.is_set():
            self.tracker.wait(COMPLETION_POLL_S)
            if self._stopping.is_set():
                return
            for series in self.tracker.pop_complete():
                audit.instances_received(
                    self.audit,
                    calling_ae=series.calling_ae,
                    called_ae=series.called_ae,
                    study_uid=series.study_uid,
                    series_uid=series.series_uid,
                    count=series.received,
                )
                self._retry_dispatch.pop(series.series_uid, None)  # newer instances: dispatch them now
                self._dispatch(series)
            now = time.monotonic()
            for uid, (series, due) in list(self._retry_dispatch.items()):
                if due <= now:
                    del self._retry_dispatch[uid]
                    self._dispatch(series)

    def _dispatch(self, series: PendingSeries) -> None:
        try:
            result = self.dispatcher.series_complete(series)
        except Exception:  # must not stop completion of other series: this one is tried again on a timer
            LOG.exception(
                "dispatch of series %s failed; retried in %.0f s", series.series_uid, DISPATCH_RETRY_S
            )
            self._retry_dispatch[series.series_uid] = (series, time.monotonic() + DISPATCH_RETRY_S)
            return
        self.completed.append(result)
        del self.completed[:-100]

    def _restore_pending(self) -> int:
        """Series on disk that were never evaluated (or gained instances since) go back to the tracker."""
        restored = 0
        for study_uid, series_uid in self.store.series_on_disk():
            sop_uids = self.store.sop_uids(study_uid, series_uid)
            if not sop_uids or self.dispatcher.ledger.evaluated(study_uid, series_uid, sop_uids):
                continue
            first = self.store.series_dir(study_uid, series_uid) / (sop_uids[0] + SUFFIX)
            try:
                header, calling, called = read_stored_header(first)
            except (InvalidInstance, OSError) as exc:
                LOG.error("cannot re-read %s: %s", first, exc)
                continue
            self.tracker.restore(header, calling, called, len(sop_uids))
            restored += 1
        return restored


def _stats(assoc: Any) -> AssociationStats:
    stats = getattr(assoc, "_openmsk_stats", None)
    if stats is None:  # an association that bypassed EVT_CONN_OPEN (cannot happen with pynetdicom 3.0)
        stats = assoc._openmsk_stats = AssociationStats(-id(assoc), "?")
    return stats


def reject(assoc: Any, reason: tuple[int, int, int]) -> None:
    """Send an A-ASSOCIATE-RJ and wait (as pynetdicom's own rejections do) until the peer has it."""
    assoc.acse.send_reject(*reason)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def read_stored_header(path: Path) -> tuple[InstanceHeader, str, str]:
    """The header of a file this SCP stored, plus the calling and called AE from its file meta."""
    meta = read_file_meta(path)
    data = path.read_bytes()
    group_length = int.from_bytes(data[140:144], "little")
    header = read_header(memoryview(data)[144 + group_length :], meta.get(0x00020010, ""))
    return header, meta.get(0x00020016, ""), meta.get(0x00020018, "")


def load_rules(settings: Settings) -> RoutingRules:
    """The routing rules from settings, with ``default`` resolved through the model registry."""
    default_model, known = resolve_default_model(settings)
    try:
        return RoutingRules.load(settings.routing_rules, default_model, known)
    except RoutingError as exc:
        raise ConfigError(f"{env_name('routing_rules')}: {exc}") from None


def run_forever(settings: Settings, rules: RoutingRules | None = None) -> int:
    """``openmsk scp``: run until SIGTERM/SIGINT, then stop cleanly. Returns the exit code."""
    import signal

    scp = StorageSCP(settings, rules)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        scp.start()
    except OSError as exc:
        print(
            f"openmsk scp: cannot listen on {settings.scp_host}:{settings.scp_port}: {exc}", file=sys.stderr
        )
        return 1
    print(f"SCP {settings.scp_ae_title} ready on {settings.scp_host}:{scp.port}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        scp.stop()
    return 0
