"""A fast path through pynetdicom for a busy Storage SCP (pynetdicom stays in charge of everything else).

A plain pynetdicom Storage SCP reaches about a quarter of dcmtk's speed. Per instance it pays for two threads
that poll (the DUL thread sleeps 1 ms whenever its socket had nothing to read, the association thread 1 ms
before every look at its queue), a hand-over between them in each direction with a fight for the GIL each
time, and pydicom datasets for two tiny command sets with regex validation of every UID. This module, wired
per association by :func:`accelerate` from ``EVT_CONN_OPEN``, removes those costs without changing the
protocol:

* **C-STORE in the DUL thread** (:class:`FastStoreReceiver`): the P-DATA fragments of a C-STORE-RQ are
  gathered where they arrive; when the data set is complete, the store callback runs right there and the
  C-STORE-RSP (encoded by :func:`encode_c_store_rsp`, byte-identical to pynetdicom's) goes straight onto the
  socket. Every other message (C-ECHO, anything unusual) is handed to pynetdicom's own DIMSE provider
  unchanged.
* **Wakeable sleeps** for what still runs the stock way: the DUL thread waits in ``select()`` on its socket
  and a wake-up pipe written whenever a primitive is queued for sending; the association thread waits on an
  event set whenever something is queued for it. A sleep never lasts longer than pynetdicom asked, so every
  polling loop sees its flags and timers as before; threads this module did not wire (an SCU in the same
  process) sleep as usual.
* **Reads into a preallocated buffer** instead of joining 4 kB pieces, and a cheap per-association copy of the
  presentation contexts (a deep copy re-validates ~7,700 UIDs per association).

Checked against pynetdicom 3.0 (``pyproject.toml`` pins ``>=3.0,<3.1``); :func:`install` refuses to patch a
pynetdicom whose modules no longer look the way this expects, and the SCP then runs at stock speed with the
same results.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

LOG = logging.getLogger("openmsk.scp")

# A peer announcing a PDU larger than this is read the stock way (growing as bytes arrive), so a bogus length
# can never make us allocate gigabytes up front.
MAX_PREALLOCATED_PDU = 4 << 20

_real_sleep = time.sleep
_installed = False
_install_lock = threading.Lock()


class _WakeableTime(types.ModuleType):
    """Stands in for the ``time`` module inside pynetdicom's reactors: ``sleep`` ends early on a wake-up."""

    def __init__(self) -> None:
        super().__init__("time")

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(delay: float) -> None:
        wait: Callable[[float], None] | None = getattr(threading.current_thread(), "_openmsk_wait", None)
        if wait is None:
            _real_sleep(delay)
        else:
            wait(delay)


def install() -> bool:
    """Make pynetdicom's reactor sleeps wakeable (once per process); False if this pynetdicom is unknown."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        from pynetdicom import association, dul, transport

        if getattr(dul, "time", None) is not time or getattr(association, "time", None) is not time:
            LOG.warning("pynetdicom internals changed; the SCP runs without its fast path")
            return False
        dul.time = _WakeableTime()  # type: ignore[attr-defined]
        association.time = _WakeableTime()  # type: ignore[attr-defined]
        if getattr(transport, "deepcopy", None) is copy.deepcopy:
            transport.deepcopy = _copy_contexts  # type: ignore[attr-defined]
        _installed = True
        return True


def _copy_contexts(value: Any, memo: dict | None = None) -> Any:
    """``deepcopy`` for the server's list of presentation contexts, copied for every new association.

    A real deep copy rebuilds (and re-validates with a regex) every transfer syntax UID: ~7,700 UIDs and
    0.1-0.5 s of CPU per association for 170 storage classes × 45 transfer syntaxes. UIDs are immutable
    strings, so a context only needs its own transfer-syntax list.
    """
    from pynetdicom.presentation import PresentationContext

    if isinstance(value, list) and all(type(cx) is PresentationContext for cx in value):
        copies = []
        for context in value:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies
    return copy.deepcopy(value, memo)


class _WakeQueue(queue.Queue):
    """A queue that calls ``wake`` after every put."""

    def __init__(self, wake: Callable[[], None], items: list[Any]) -> None:
        super().__init__()
        for item in items:
            super().put(item)
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def _drain(old: queue.Queue) -> list[Any]:
    items = []
    while True:
        try:
            items.append(old.get_nowait())
        except queue.Empty:
            return items


def _recv_exact(assoc_socket: Any, stock_recv: Callable[[int], bytearray], nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: read exactly ``nr_bytes`` (fewer only if the peer closed)."""
    if nr_bytes > MAX_PREALLOCATED_PDU:
        return stock_recv(nr_bytes)
    sock = assoc_socket.socket
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    got = 0
    try:
        while got < nr_bytes:
            count = sock.recv_into(view[got:], nr_bytes - got)
            if not count:
                break
            got += count
    finally:
        view.release()
    if got < nr_bytes:
        del buffer[got:]
    return buffer


def accelerate(assoc: Any, store: StoreCallback | None = None) -> None:
    """Wire one acceptor association (call it from ``EVT_CONN_OPEN``); ``store`` serves its C-STOREs."""
    if not _installed:
        return
    dul = assoc.dul
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # Closed when the DUL object is collected: then no thread can still be selecting on them.
    weakref.finalize(dul, os.close, read_fd)
    weakref.finalize(dul, os.close, write_fd)

    def wake_dul() -> None:
        with contextlib.suppress(OSError):  # pipe full: a wake-up is pending anyway
            os.write(write_fd, b"\0")

    def dul_wait(delay: float) -> None:
        raw = getattr(dul.socket, "socket", None)
        try:
            if raw is not None and getattr(raw, "pending", None) and raw.pending():
                return  # TLS: decrypted bytes are buffered where select() cannot see them
            ready, _, _ = select.select([read_fd] if raw is None else [raw, read_fd], [], [], delay)
            if read_fd in ready:
                os.read(read_fd, 4096)
        except (OSError, ValueError):  # socket closed under us: behave like the stock sleep
            _real_sleep(delay)

    assoc_event = threading.Event()

    def assoc_wait(delay: float) -> None:
        assoc_event.wait(delay)
        assoc_event.clear()

    dul.to_provider_queue = _WakeQueue(wake_dul, _drain(dul.to_provider_queue))
    dul.to_user_queue = _WakeQueue(assoc_event.set, _drain(dul.to_user_queue))
    assoc.dimse.msg_queue = _WakeQueue(assoc_event.set, _drain(assoc.dimse.msg_queue))
    dul._openmsk_wait = dul_wait
    assoc._openmsk_wait = assoc_wait
    sock = dul.socket
    if sock is not None:
        sock.recv = functools.partial(_recv_exact, sock, sock.recv)
    if store is not None:
        receiver = FastStoreReceiver(assoc, store, assoc.dimse.receive_primitive)
        assoc.dimse.receive_primitive = receiver
        if sock is not None and not isinstance(sock.socket, ssl.SSLSocket):  # TLS cannot peek
            dul._read_pdu_data = functools.partial(_read_pdu_fast, dul, receiver, dul._read_pdu_data)


def _read_pdu_fast(dul: Any, receiver: FastStoreReceiver, stock_read: Callable[[], None]) -> None:
    """``DULServiceProvider._read_pdu_data`` that gives P-DATA-TF PDUs straight to the receiver.

    Only in Sta6 (association established) and only for P-DATA-TF: a peek at the PDU header decides, and
    every other PDU is read by pynetdicom as usual. This skips decoding the PDU into objects, two queues and
    the state machine for the bulk of the traffic (P-DATA in Sta6 leaves the state unchanged: DT-2).
    """
    sock = dul.socket
    raw = getattr(sock, "socket", None)
    if raw is None or receiver.stock_only or dul.state_machine.current_state != "Sta6":
        stock_read()
        return
    try:
        head = raw.recv(6, socket.MSG_PEEK)
    except (OSError, ValueError):
        stock_read()
        return
    length = int.from_bytes(head[2:6], "big") if len(head) == 6 else 0
    if len(head) < 6 or head[0] != 0x04 or length > MAX_PREALLOCATED_PDU:
        stock_read()
        return
    try:
        pdu = sock.recv(6 + length)
    except (OSError, TimeoutError):
        pdu = b""
    if len(pdu) != 6 + length:
        dul.event_queue.put("Evt17")  # connection closed mid-PDU, as pynetdicom reports it
        return
    view = memoryview(pdu)
    pdvs: list[tuple[int, memoryview]] = []
    position = 6
    while position < len(pdu):
        item = int.from_bytes(pdu[position : position + 4], "big")
        if item < 2 or position + 4 + item > len(pdu):
            dul.event_queue.put("Evt19")  # invalid PDU: pynetdicom aborts the association
            return
        pdvs.append((pdu[position + 4], view[position + 5 : position + 4 + item]))
        position += 4 + item
    receiver.feed(pdvs)


# ------------------------------------------------------------------------------------------ C-STORE fast path


@dataclass(frozen=True)
class StoreRequest:
    """What a C-STORE-RQ asks for, as the store callback sees it."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    context_id: int
    transfer_syntax: str


class Step(StrEnum):
    """Where one P-DATA fragment leaves the message it belongs to (:meth:`FastStoreReceiver._advance`)."""

    MORE = "more"  # the message goes on
    DONE = "done"  # the message is complete
    ERROR = "error"  # malformed: the association goes to pynetdicom for good


# store(assoc, request, encoded data set) -> (status, error comment or None)
# (association, request, data set, after) -> (status, error comment); what the callback puts into *after* runs
# once the response is sent (the store's renames, while the sender reads its next instance).
StoreCallback = Callable[[Any, StoreRequest, bytes, list[Callable[[], object]]], tuple[int, str | None]]

_COMMAND = 0x01  # message control header bit 0: command (1) or data set (0) fragment
_LAST = 0x02  # bit 1: last fragment
_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101
_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")


def parse_command(command: bytes) -> dict[int, bytes]:
    """The elements of a command set (Implicit VR Little Endian, group 0000) as ``{element: value}``."""
    values: dict[int, bytes] = {}
    position, size = 0, len(command)
    while position < size:
        if position + 8 > size:
            raise ValueError("command set truncated")
        group, element, length = _ELEMENT.unpack_from(command, position)
        position += 8
        if group != 0x0000 or position + length > size:
            raise ValueError("not a command set")
        values[element] = command[position : position + length]
        position += length
    return values


class FastStoreReceiver:
    """Stands in for ``DIMSEServiceProvider.receive_primitive`` of one association (called by the DUL thread).

    The P-DATA primitives of a message are kept until its command set is complete. A plain C-STORE-RQ is then
    served here; any other message is replayed to pynetdicom's own ``receive_primitive``, and so is the rest
    of it. After anything malformed the association stays with pynetdicom for good (it knows how to abort).
    """

    def __init__(self, assoc: Any, store: StoreCallback, stock: Callable[[Any], None]) -> None:
        self.assoc = assoc
        self.store = store
        self.stock = stock
        self.stock_only = False
        self._reset()

    def _reset(self) -> None:
        self.kept: list[Any] = []  # primitives of the current message, for a replay
        self.command = bytearray()
        self.command_done = False
        self.values: dict[int, bytes] = {}
        self.context_id: int | None = None
        self.request: StoreRequest | None = None
        self.fragments: list[bytes] = []
        self.to_stock = False  # the current message goes to pynetdicom

    def _advance(self, context_id: int, data: bytes) -> Step:
        """Account for one fragment: ``MORE`` to come, ``DONE`` (message complete) or ``ERROR``."""
        if not data or self.context_id not in (None, context_id):
            return Step.ERROR
        self.context_id = context_id
        header, last = data[0], data[0] & _LAST
        if not self.command_done:
            if not header & _COMMAND:
                return Step.ERROR
            self.command += data[1:]
            if not last:
                return Step.MORE
            self.command_done = True
            try:
                self.values = parse_command(bytes(self.command))
                has_data_set = _US.unpack(self.values[0x0800])[0] != _NO_DATA_SET
            except (KeyError, ValueError, struct.error):
                return Step.ERROR
            return Step.MORE if has_data_set else Step.DONE
        if header & _COMMAND:
            return Step.ERROR
        if not self.to_stock:
            self.fragments.append(memoryview(data)[1:])
        return Step.DONE if last else Step.MORE

    def __call__(self, primitive: Any) -> None:
        """A P-DATA primitive from pynetdicom's state machine."""
        self.feed(primitive.presentation_data_value_list, primitive)

    def feed(self, pdvs: list[tuple[int, Any]], primitive: Any | None = None) -> None:
        """The presentation data values of one P-DATA-TF PDU (``primitive``: the same as P-DATA, if any)."""
        if primitive is None:
            primitive = pdvs
        if self.stock_only:
            self._to_stock(primitive)
            return
        steps = [self._advance(cid, data) for cid, data in pdvs]
        if Step.ERROR in steps or not steps:
            self.stock_only = True
            self._replay(primitive)
            return
        if self.to_stock:
            self._to_stock(primitive)
        else:
            self.kept.append(primitive)
            if self.request is None and self.command_done:
                self.request = self._store_request()
                if self.request is None:
                    self.to_stock = True
                    self._replay()
        if Step.DONE in steps:
            if not self.to_stock and self.request is not None:
                self._serve(self.request, b"".join(self.fragments))
            self._reset()

    def _replay(self, current: Any | None = None) -> None:
        kept, self.kept = self.kept, []
        for primitive in kept:
            self._to_stock(primitive)
        if current is not None:
            self._to_stock(current)

    def _to_stock(self, primitive: Any) -> None:
        """Give a P-DATA to pynetdicom's DIMSE provider (made from raw values if it came by the fast read)."""
        if isinstance(primitive, list):
            from pynetdicom.pdu_primitives import P_DATA

            pdvs = primitive
            primitive = P_DATA()
            for context_id, data in pdvs:
                primitive.presentation_data_value_list.append((context_id, bytes(data)))
        self.stock(primitive)

    def _store_request(self) -> StoreRequest | None:
        """The C-STORE-RQ in the command set, or None if pynetdicom should serve this message."""
        from pynetdicom.service_class import StorageServiceClass
        from pynetdicom.sop_class import uid_to_service_class

        assoc, values = self.assoc, self.values
        try:
            if _US.unpack(values[0x0100])[0] != _C_STORE_RQ or _US.unpack(values[0x0800])[0] == _NO_DATA_SET:
                return None
            message_id = _US.unpack(values[0x0110])[0]
            sop_class = values[0x0002].decode("ascii").rstrip("\0 ")
            sop_instance = values[0x1000].decode("ascii").rstrip("\0 ")
            transfer_syntax = str(assoc._accepted_cx[self.context_id].transfer_syntax[0])
        except (KeyError, ValueError, struct.error, UnicodeDecodeError):
            return None
        if (
            assoc._sent_release
            or sop_class in assoc.acceptor.accepted_common_extended
            or not issubclass(uid_to_service_class(sop_class), StorageServiceClass)
        ):
            return None
        return StoreRequest(message_id, sop_class, sop_instance, int(self.context_id or 0), transfer_syntax)

    def _serve(self, request: StoreRequest, dataset: bytes) -> None:
        after: list[Callable[[], object]] = []
        try:
            status, comment = self.store(self.assoc, request, dataset, after)
        except Exception:  # a failing store must answer, not take the association down
            LOG.exception("storing instance %s failed", request.sop_instance_uid)
            status, comment = 0xC000, "internal error while storing"
        command = encode_c_store_rsp(
            request.message_id, request.sop_class_uid, request.sop_instance_uid, status, comment
        )
        pdv = struct.pack(">LB", len(command) + 2, request.context_id) + bytes((_COMMAND | _LAST,)) + command
        try:
            self.assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv)
        finally:
            for step in after:
                try:
                    step()
                except Exception:  # acknowledged and durable: the next start moves it into place
                    LOG.exception(
                        "instance %s is stored but could not be moved into its series folder; it stays in "
                        ".partial/ until the SCP restarts",
                        request.sop_instance_uid,
                    )


def _uid_value(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def encode_c_store_rsp(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int, error_comment: str | None = None
) -> bytes:
    """The Command Set of a C-STORE-RSP (PS3.7 §9.3.1.2), Implicit VR Little Endian, like pynetdicom's."""
    sop_class, sop_instance = _uid_value(sop_class_uid), _uid_value(sop_instance_uid)
    parts = [
        _ELEMENT.pack(0x0000, 0x0002, len(sop_class)),
        sop_class,
        _ELEMENT.pack(0x0000, 0x0100, 2),
        _US.pack(0x8001),  # CommandField: C-STORE-RSP
        _ELEMENT.pack(0x0000, 0x0120, 2),
        _US.pack(message_id),
        _ELEMENT.pack(0x0000, 0x0800, 2),
        _US.pack(_NO_DATA_SET),
        _ELEMENT.pack(0x0000, 0x0900, 2),
        _US.pack(status),
    ]
    if error_comment:
        comment = error_comment[:64].encode("ascii", "replace")
        comment += b" " * (len(comment) % 2)
        parts += [_ELEMENT.pack(0x0000, 0x0902, len(comment)), comment]
    parts += [_ELEMENT.pack(0x0000, 0x1000, len(sop_instance)), sop_instance]
    body = b"".join(parts)
    return _ELEMENT.pack(0x0000, 0x0000, 4) + struct.pack("<L", len(body)) + body
