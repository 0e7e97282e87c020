"""Sending DICOM files over C-STORE exactly as they are on disk (the archive forwarding of received images).

pynetdicom reads a file path's data set in chunks and sends its bytes unchanged when
``STORE_SEND_CHUNKED_DATASET`` is on, so an instance reaches the archive as the scanner encoded it: no decoding,
no transcoding. The presentation contexts proposed are exactly the (SOP class, transfer syntax) pairs of the
files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config

from destinations.base import DeliveryError

_config.STORE_SEND_CHUNKED_DATASET = True  # send a file's bytes as they are (and never hold it in memory)

ACCEPTED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})  # success and the storage warnings
MAX_CONTEXTS = 128  # what one association may propose (PS3.8)


def store_files(
    files: list[Path],
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str,
    on_sent: Callable[[int], None] | None = None,
) -> None:
    """C-STORE every file to ``ae_title@host:port``; raise :class:`DeliveryError` at the first refusal.

    ``on_sent(n)`` is told after each stored instance how many are done (for the progress shown on job pages).
    """
    pairs: dict[Path, tuple[str, str]] = {}
    for path in files:
        meta = read_file_meta_info(path)
        try:
            pairs[path] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except AttributeError:
            raise DeliveryError(f"{path.name} has no DICOM file meta (SOP class, transfer syntax)") from None
    contexts = sorted(set(pairs.values()))
    if len(contexts) > MAX_CONTEXTS:
        raise DeliveryError(
            f"{len(contexts)} SOP class/transfer syntax pairs: more than one association holds"
        )
    ae = AE(ae_title=calling_ae_title)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"{ae_title}@{host}:{port} refused the association or cannot be reached")
    try:
        for count, path in enumerate(files, 1):
            try:
                status = assoc.send_c_store(path)
            except (ValueError, RuntimeError) as exc:  # no accepted context, or the association dropped
                raise DeliveryError(f"{ae_title} did not take {path.name}: {exc}") from None
            code = status.get("Status") if status else None
            if code not in ACCEPTED:
                shown = "no answer" if code is None else f"status 0x{code:04X}"
                raise DeliveryError(f"{ae_title} answered C-STORE of {path.name} with {shown}")
            if on_sent is not None:
                on_sent(count)
    finally:
        if assoc.is_established:
            assoc.release()
