"""A seeded DICOM fuzzer for the SCP: mutated phantom instances and pydicom's own test files, sent raw.

Used by ``tests/test_fuzz_dicom.py`` (a bounded number of cases) and ``bench/faults.py`` (as many as asked).
Every case is the encoded data set of a C-STORE exactly as the client sends it — never re-encoded by pydicom,
so the bytes can be anything: truncated, bit-flipped, with lying length fields, encoded in another transfer
syntax than the presentation context says, or with huge values. :class:`RawStoreClient` sends such bytes over
a real association (many cases per association) and returns the status the SCP answered.

The same seed gives the same cases, so a crash found here can be replayed.
"""

from __future__ import annotations

import random
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

from tests.mr_series import mr_dataset

SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)
# Per case a fresh SOP Instance UID of fixed length, patched into the encoded bytes (no re-encoding per case).
_UID_PREFIX = "1.2.826.0.1.3680043.10.543."
_PLACEHOLDER = _UID_PREFIX + "0" * 20


def sop_uid(seed: int, index: int) -> str:
    """The SOP Instance UID of case ``index``: as long as the placeholder, never with a leading zero."""
    return f"{_UID_PREFIX}{seed % 9 + 1}{index:019d}"


@dataclass(frozen=True)
class Case:
    """One C-STORE to send: its data set bytes, the context's transfer syntax, the command's UIDs."""

    name: str
    transfer_syntax: str
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str


def encode(ds: Any, transfer_syntax: str) -> bytes:
    """A data set encoded without file meta in ``transfer_syntax`` (deflated: raw deflate, PS3.5 A.5)."""
    buffer = DicomBytesIO()
    explicit = transfer_syntax != ImplicitVRLittleEndian
    buffer.is_little_endian = transfer_syntax != ExplicitVRBigEndian
    buffer.is_implicit_VR = not explicit
    write_dataset(buffer, ds)
    raw = buffer.getvalue()
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = compressor.compress(raw) + compressor.flush()
    return raw


def base_instances(seed: int, size: int = 16) -> dict[str, bytes]:
    """A valid small MR instance (placeholder SOP UID) encoded in each transfer syntax of :data:`SYNTAXES`."""
    rng = random.Random(seed)
    pixels = bytes(rng.randrange(256) for _ in range(size * size * 2))
    ds = mr_dataset(0, "1.2.826.0.1.3680043.10.543.1", "1.2.826.0.1.3680043.10.543.2", pixels, size, size)
    ds.SOPInstanceUID = _PLACEHOLDER
    ds.FrameOfReferenceUID = _UID_PREFIX + "3"  # fixed, so that a seed gives the same bytes every run
    return {ts: encode(ds, ts) for ts in SYNTAXES}


def _elements(data: bytes, little: bool, implicit: bool) -> list[tuple[int, int, int]]:
    """(offset of the length field, its width in bytes, value offset) of the top-level elements, best effort."""
    order = "<" if little else ">"
    found, pos = [], 0
    while pos + 8 <= len(data):
        if implicit:
            (length,) = struct.unpack_from(order + "L", data, pos + 4)
            found.append((pos + 4, 4, pos + 8))
            pos += 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"UC", b"UR", b"OD", b"OL", b"OV"):
                if pos + 12 > len(data):
                    break
                (length,) = struct.unpack_from(order + "L", data, pos + 8)
                found.append((pos + 8, 4, pos + 12))
                pos += 12
            else:
                (length,) = struct.unpack_from(order + "H", data, pos + 6)
                found.append((pos + 6, 2, pos + 8))
                pos += 8
        if length == 0xFFFFFFFF:
            break  # a sequence of undefined length: the walk stops here (enough targets before it)
        pos += length
    return found


class Mutator:
    """Seeded mutations of an encoded data set; each returns ``(name, bytes)``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def truncate(self, data: bytes) -> tuple[str, bytes]:
        cut = self.rng.randrange(0, len(data))
        return "truncate", data[:cut]

    def bit_flips(self, data: bytes) -> tuple[str, bytes]:
        buf = bytearray(data)
        for _ in range(self.rng.choice((1, 2, 4, 16, 64))):
            buf[self.rng.randrange(len(buf))] ^= 1 << self.rng.randrange(8)
        return "bit flips", bytes(buf)

    def byte_noise(self, data: bytes) -> tuple[str, bytes]:
        buf = bytearray(data)
        start = self.rng.randrange(len(buf))
        for index in range(start, min(len(buf), start + self.rng.randrange(1, 64))):
            buf[index] = self.rng.randrange(256)
        return "random bytes", bytes(buf)

    def length_field(self, data: bytes, little: bool, implicit: bool) -> tuple[str, bytes]:
        elements = _elements(data, little, implicit)
        if not elements:
            return self.truncate(data)
        offset, width, _ = self.rng.choice(elements)
        limit = (1 << (8 * width)) - 1
        value = self.rng.choice((0, 1, 3, 0xFFFF, limit, limit - 1, self.rng.randrange(limit), len(data) * 2))
        order = ("<" if little else ">") + ("H" if width == 2 else "L")
        buf = bytearray(data)
        struct.pack_into(order, buf, offset, value & limit)
        return "length field", bytes(buf)

    def huge_value(self, data: bytes, little: bool, implicit: bool) -> tuple[str, bytes]:
        """An element whose value (and length) is blown up: 64 kB in a short VR, up to 1 MB in a long one."""
        elements = _elements(data, little, implicit)
        if not elements:
            return self.truncate(data)
        offset, width, value_at = self.rng.choice(elements)
        order = ("<" if little else ">") + ("H" if width == 2 else "L")
        (old,) = struct.unpack_from(order, data, offset)
        new = 0xFFFE if width == 2 else self.rng.choice((256 << 10, 1 << 20))
        filler = bytes([self.rng.choice((0x20, 0x00, 0x41, 0xFF))]) * new
        head = bytearray(data[:value_at])
        struct.pack_into(order, head, offset, new)
        return "huge value", bytes(head) + filler + data[value_at + old :]

    def duplicate_span(self, data: bytes) -> tuple[str, bytes]:
        start = self.rng.randrange(len(data))
        end = min(len(data), start + self.rng.randrange(1, 256))
        return "duplicated bytes", data[:end] + data[start:end] + data[end:]


def mutation_cases(seed: int, count: int) -> Iterator[Case]:
    """``count`` mutated cases over :func:`base_instances` (also valid ones, and ones in the wrong syntax)."""
    bases = base_instances(seed)
    mutator = Mutator(seed)
    rng = random.Random(seed + 1)
    for index in range(count):
        uid = sop_uid(seed, index).encode("ascii")
        syntax = rng.choice(SYNTAXES)
        source = bases[syntax].replace(_PLACEHOLDER.encode("ascii"), uid)
        if syntax == DeflatedExplicitVRLittleEndian:
            source = bases[ExplicitVRLittleEndian].replace(_PLACEHOLDER.encode("ascii"), uid)
        little, implicit = syntax != ExplicitVRBigEndian, syntax == ImplicitVRLittleEndian
        roll = rng.random()
        if roll < 0.04:
            name, data = "valid", source
        elif roll < 0.14:
            name, data = "wrong transfer syntax", source
            syntax = rng.choice([ts for ts in SYNTAXES if ts != syntax])
        elif roll < 0.3:
            name, data = mutator.truncate(source)
        elif roll < 0.5:
            name, data = mutator.bit_flips(source)
        elif roll < 0.6:
            name, data = mutator.byte_noise(source)
        elif roll < 0.8:
            name, data = mutator.length_field(source, little, implicit)
        elif roll < 0.9:
            name, data = mutator.huge_value(source, little, implicit)
        else:
            name, data = mutator.duplicate_span(source)
        if syntax == DeflatedExplicitVRLittleEndian and name != "wrong transfer syntax":
            if rng.random() < 0.5:  # mutate before deflating (valid deflate, broken data set) or after
                compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
                data = compressor.compress(data) + compressor.flush()
            else:
                compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
                deflated = compressor.compress(source) + compressor.flush()
                name, data = Mutator(seed + index).bit_flips(deflated)
                name = f"deflated {name}"
        yield Case(name, syntax, data, MRImageStorage, uid.decode("ascii"))


def pydicom_file_cases() -> Iterator[Case]:
    """pydicom's test files (with PyPI pydicom-data's where installed), each data set sent as stored."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_files
    from pydicom.errors import InvalidDicomError
    from pynetdicom.dsutils import split_dataset

    for path in sorted(get_testdata_files()):
        try:
            meta, offset = split_dataset(Path(path))
            sop_class = str(meta.MediaStorageSOPClassUID)
            sop_instance = str(meta.MediaStorageSOPInstanceUID)
            syntax = str(meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, ValueError, OSError, KeyError, EOFError):
            try:  # no usable file meta: the data set as read, sent in Explicit VR Little Endian
                ds = dcmread(path, force=True)
                sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
                data = encode(ds, ExplicitVRLittleEndian)
            except Exception:  # a test file pydicom itself cannot read: nothing to send
                continue
            syntax = ExplicitVRLittleEndian
        else:
            data = Path(path).read_bytes()[offset:]
        if not sop_class or not sop_instance or not data:
            continue
        yield Case(f"pydicom testdata {Path(path).name}", syntax, data, sop_class, sop_instance)


# C-STORE statuses a Storage SCP may answer (PS3.4 B.2.3, PS3.7 C): anything else is not "a proper status".
PROPER_STATUSES = (0x0000, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007)


def proper(status: int) -> bool:
    return status in PROPER_STATUSES or status >> 8 in (0xA7, 0xA9) or status >> 12 == 0xC


class RawStoreClient:
    """An SCU that sends :class:`Case` bytes as C-STORE data sets over one association per context set."""

    def __init__(
        self,
        host: str,
        port: int,
        called_ae: str = "OPENMSK",
        calling_ae: str = "FUZZER",
        timeout_s: float = 10,
    ) -> None:
        self.host, self.port, self.called_ae, self.calling_ae = host, port, called_ae, calling_ae
        self.timeout_s = timeout_s  # no answer within this: the case counts as crashed
        self.assoc: Any = None
        self._message_id = 0

    def open(self, contexts: list[tuple[str, str]]) -> bool:
        """Associate proposing each ``(SOP class, transfer syntax)`` (at most 128)."""
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.network_timeout = 30
        ae.dimse_timeout = self.timeout_s
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, syntax)
        self.assoc = ae.associate(self.host, self.port, ae_title=self.called_ae)
        if not self.assoc.is_established:
            return False
        # A command and its data set go as two small writes: without this, Nagle's algorithm and the peer's
        # delayed ACK cost 40 ms per case (dcmtk's tools get the same from TCP_NODELAY=1).
        self.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Keep the association's reactor paused for the whole session. Pausing it per message, as
        # Association.send_c_store does, races: the reactor may run one more pass after a quick
        # clear-set-clear and take the next response off the queue (measured: ~1 in 500 fast answers lost).
        self.assoc._reactor_checkpoint.clear()
        time.sleep(0.01)
        deadline = time.monotonic() + 5
        while not self.assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.0005)
        return True

    def context_id(self, sop_class: str, syntax: str) -> int | None:
        for context in self.assoc.accepted_contexts:
            if context.abstract_syntax == sop_class and context.transfer_syntax[0] == syntax:
                return int(context.context_id)
        return None

    def send(self, case: Case) -> int | None:
        """Send one case; the status answered, or None when no answer came (association gone or timed out)."""
        from pynetdicom.dimse_primitives import C_STORE

        context_id = self.context_id(case.sop_class_uid, case.transfer_syntax)
        if context_id is None or not self.assoc.is_established:
            return None
        self._message_id = self._message_id % 65535 + 1
        request = C_STORE()
        request.MessageID = self._message_id
        request.Priority = 2
        request.AffectedSOPClassUID = case.sop_class_uid
        request.AffectedSOPInstanceUID = case.sop_instance_uid
        request.DataSet = BytesIO(case.data)
        self.assoc.dimse.send_msg(request, context_id)
        _, response = self.assoc.dimse.get_msg(block=True)
        if response is None or getattr(response, "Status", None) is None:
            return None
        return int(response.Status)

    def close(self) -> None:
        if self.assoc is not None:
            self.assoc._reactor_checkpoint.set()
            if self.assoc.is_established:
                self.assoc.release()
        self.assoc = None


@dataclass
class FuzzCounts:
    """What became of the cases: refused with a status, stored, or crashed (no proper answer)."""

    sent: int = 0
    stored: int = 0
    rejected: int = 0
    crashed: int = 0
    not_negotiated: int = 0


def run_cases(
    host: str, port: int, cases: list[Case], per_association: int = 500
) -> tuple[FuzzCounts, list[tuple[Case, int | None, str]]]:
    """Send ``cases`` (grouped into associations); the counts, and ``(case, status, outcome)`` of each.

    ``outcome`` is ``stored``, ``rejected``, ``crashed`` or ``not negotiated`` (the SCP accepted no context
    for the case's SOP class and transfer syntax: nothing was sent).

    A case without an answer, or with a status no Storage SCP may send, counts as crashed; the association is
    then opened again for the remaining cases.
    """
    counts, results = FuzzCounts(), []
    contexts = sorted({(c.sop_class_uid, c.transfer_syntax) for c in cases})
    client = RawStoreClient(host, port)
    # An association proposes at most 128 contexts: group the cases by the context they need.
    groups = [contexts[i : i + 120] for i in range(0, len(contexts), 120)]
    for group in groups:
        wanted = set(group)
        pending = [c for c in cases if (c.sop_class_uid, c.transfer_syntax) in wanted]
        for start in range(0, len(pending), per_association):
            if not client.open(group):
                raise ConnectionError("the SCP refused the fuzzing association")
            try:
                for case in pending[start : start + per_association]:
                    if client.context_id(case.sop_class_uid, case.transfer_syntax) is None:
                        counts.not_negotiated += 1
                        results.append((case, None, "not negotiated"))
                        continue
                    status = client.send(case)
                    counts.sent += 1
                    outcome = "crashed" if status is None or not proper(status) else "rejected"
                    if status == 0x0000:
                        outcome = "stored"
                    results.append((case, status, outcome))
                    if outcome == "crashed":
                        counts.crashed += 1
                        client.close()
                        if not client.open(group):
                            raise ConnectionError("the SCP is gone after a case")
                    elif status == 0x0000:
                        counts.stored += 1
                    else:
                        counts.rejected += 1
            finally:
                client.close()
    return counts, results
