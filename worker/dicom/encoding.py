"""The bytes of an output's large plain sequences, encoded in one pass instead of pydicom's element by element.

A full-size knee's SEG holds ~600 per-frame functional group items (~6,000 elements), its SR ~650 content items
with ~6,000 elements more. pydicom encodes every element through its general machinery (ambiguous-VR
correction of every item, character-set lookups, a buffer per element): 0.3-0.5 s per object, on the critical
path of every job. These sequences hold only a few plain VRs (UI, CS, SH, LO, DS, US, UL, …) in ASCII, so
:func:`encode_items` writes them directly, and :func:`with_encoded_sequences` hands them to pydicom as raw
elements, which it writes as they are — pydicom's documented route for raw data (``Dataset.set_original_encoding``).

The result is byte for byte the file pydicom writes (``tests/test_dicom_encoding.py`` compares every kind of
output). Anything this module does not know — another VR, non-ASCII text, an undefined length, a transfer
syntax other than Explicit VR Little Endian, an ambiguous VR pydicom cannot resolve — leaves that object to
pydicom.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import numpy as np
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

__all__ = ["NotPlain", "encode_items", "with_encoded_sequences"]

_NUMBERS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_NUMBER_STRINGS = frozenset({"DS", "IS"})
_STRINGS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UR", "UT"})
# value length in 4 bytes after two reserved ones (PS3.5 7.1.2); the other VRs have 2 bytes
_LONG_LENGTH = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)


class NotPlain(ValueError):
    """A sequence holds something :func:`encode_items` leaves to pydicom."""


def encode_items(items: Iterable[Dataset]) -> bytes:
    """The value of a sequence of *items* in Explicit VR Little Endian: items of defined length, as pydicom
    writes them. Raises :class:`NotPlain` for content this module does not encode."""
    out = bytearray()
    for item in items:
        if getattr(item, "is_undefined_length_sequence_item", False):
            raise NotPlain("an item of undefined length")
        body = _encode_dataset(item)
        out += _ITEM + struct.pack("<L", len(body)) + body
    return bytes(out)


def _encode_dataset(dataset: Dataset) -> bytes:
    parts: list[bytes] = []
    for tag in sorted(dataset.keys()):
        if tag.element == 0 and tag.group > 6:  # retired group lengths: pydicom does not write them either
            continue
        element = dataset.get_item(tag)
        if isinstance(element, RawDataElement):
            raise NotPlain("a raw element")
        parts.append(_encode_element(element))
    return b"".join(parts)


def _encode_element(element: DataElement) -> bytes:
    vr = element.VR
    if vr == "SQ":
        if element.is_undefined_length:
            raise NotPlain("a sequence of undefined length")
        value = encode_items(element.value)
    elif element.is_empty:
        value = b""
    elif vr in _NUMBERS:
        numbers = _values(element.value)
        value = struct.pack(f"<{len(numbers)}{_NUMBERS[vr]}", *numbers)
    elif vr in _NUMBER_STRINGS:
        values = _values(element.value)
        value = _ascii(
            "\\".join(v.original_string if hasattr(v, "original_string") else str(v) for v in values), b" "
        )
    elif vr == "UI" or vr in _STRINGS:
        values = _values(element.value)
        if not all(isinstance(v, str) for v in values):
            raise NotPlain(f"a {vr} value that is not text")
        value = _ascii("\\".join(values), b"\0" if vr == "UI" else b" ")
    else:
        raise NotPlain(f"VR {vr}")
    header = struct.pack("<HH", element.tag.group, element.tag.element) + vr.encode("ascii")
    if vr in _LONG_LENGTH:
        return header + struct.pack("<HL", 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise NotPlain(f"a {vr} value too long for its length field")
    return header + struct.pack("<H", len(value)) + value


def _values(value: Any) -> Any:
    """*value* as a sequence of values: a multi-value as it is (what pydicom writes as several), else one."""
    return value if isinstance(value, MultiValue | list | tuple | np.ndarray) else [value]


def _ascii(text: str, pad: bytes) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise NotPlain("non-ASCII text (left to pydicom's character sets)") from None
    return raw + pad if len(raw) % 2 else raw


def with_encoded_sequences(dataset: Dataset) -> Dataset:
    """*dataset* to write: a shallow copy whose top-level sequences are raw elements encoded by
    :func:`encode_items` (each one that holds only what it encodes), or *dataset* itself where none does or the
    object is not one this module writes (see the module). *dataset* keeps its elements; an ambiguous VR in it
    is resolved in place, as pydicom's own writing resolves it."""
    meta = getattr(dataset, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return dataset
    elements = list(dataset.elements())
    for element in elements:
        if len(element.VR) != 2:
            # pydicom resolves an ambiguous VR ('OB or OW' of the pixel data) while it walks the object, which
            # raw values turn off: resolved here the same way (in place, as pydicom's own writing does)
            correct_ambiguous_vr_element(element, dataset, True, [dataset])
    if any(len(element.VR) != 2 for element in elements):
        return dataset
    raw: dict[Any, RawDataElement] = {}
    for element in elements:
        if isinstance(element, DataElement) and element.VR == "SQ":
            try:
                value = encode_items(element.value)
            except NotPlain:
                continue
            raw[element.tag] = RawDataElement(element.tag, "SQ", len(value), value, 0, False, True)
    if not raw:
        return dataset
    out = Dataset()
    out.file_meta = meta
    out.preamble = getattr(dataset, "preamble", None)
    for element in elements:
        out.add(raw.get(element.tag, element))
    charset = dataset.get("SpecificCharacterSet")
    # Told that it was read in the encoding it is written in, pydicom writes the raw elements as they are.
    out.set_original_encoding(False, True, convert_encodings(charset) if charset else default_encoding)
    return out
