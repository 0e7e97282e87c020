"""Receiving an upload: the request body streamed to disk under the size limits, and zips unpacked safely.

The body is never held in memory: multipart parts stream into files of our own naming (``raw/part-NNNNN``) in
the upload folder (waitress buffers the raw body under ``DATA_DIR/tmp`` first, see ``web.server``), and the
upload stops with 413 as soon as the file parts together pass ``OPENMSK_MAX_UPLOAD_MB``. A zip is unpacked by
:func:`openmsk.archive.safe_extract` only: no entry outside the folder (zip-slip), no links, no more than
``OPENMSK_MAX_UNZIPPED_MB`` unpacked, a bounded number of entries and compression ratio (zip bombs).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

from openmsk.archive import UnsafeArchive, ZipLimits, safe_extract
from openmsk.config import Settings
from web.errors import RequestError

MB = 1024 * 1024
FILE_FIELD = "file"
MAX_PARTS = 10_000  # several .dcm files: a long series has a few thousand instances
MAX_FIELD_BYTES = MB  # form fields; also bounds the parser's buffer, which reads 64 KB at a time
MULTIPART_OVERHEAD = 4 * MB  # part headers and boundaries on top of the file bytes


def upload_limit(settings: Settings) -> int:
    """Bytes of file content one upload may hold (``OPENMSK_MAX_UPLOAD_MB``)."""
    return settings.max_upload_mb * MB


def body_limit(settings: Settings) -> int:
    """Bytes a whole request body may have: the file limit plus room for the multipart framing."""
    return upload_limit(settings) + MULTIPART_OVERHEAD


def too_large(settings: Settings) -> RequestError:
    return RequestError(
        413,
        "TOO_LARGE",
        f"The upload is larger than {settings.max_upload_mb} MB.",
        "Send the one series to segment, not the whole study (OPENMSK_MAX_UPLOAD_MB sets the limit).",
    )


class _CountingFile(io.RawIOBase):
    """A part's file on disk that stops the upload as soon as all parts together pass the limit."""

    def __init__(self, path: Path, sink: _PartSink) -> None:
        self.path, self.sink = path, sink
        self.handle: IO[bytes] = open(path, "wb+")  # noqa: SIM115 - closed by the sink

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sink.received += len(data)
        if self.sink.received > self.sink.limit:
            raise RequestEntityTooLarge()
        return self.handle.write(data)

    def read(self, size: int = -1) -> bytes:
        return self.handle.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def close(self) -> None:
        self.handle.close()
        super().close()


@dataclass
class _PartSink:
    """Werkzeug's ``stream_factory``: each file part goes to ``raw/part-NNNN`` (a name of ours)."""

    folder: Path
    limit: int
    received: int = 0
    parts: list[_CountingFile] = field(default_factory=list)

    def __call__(self, **_: Any) -> _CountingFile:
        part = _CountingFile(self.folder / f"part-{len(self.parts):05d}", self)
        self.parts.append(part)
        return part

    def close(self) -> None:
        for part in self.parts:
            part.close()


@dataclass
class Received:
    """A parsed upload: the form fields, the file parts (in order, on disk) and their total size."""

    form: MultiDict[str, str]
    files: list[Path]
    size: int


def receive(environ: dict[str, Any], settings: Settings, folder: Path) -> Received:
    """Parse the multipart body of ``environ`` into ``folder/raw/``; only the ``file`` field's parts stay."""
    content_type = environ.get("CONTENT_TYPE", "")
    if not content_type.startswith("multipart/form-data"):
        raise RequestError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "Send the upload as multipart/form-data.",
            f"Put the file(s) in a form field called '{FILE_FIELD}'.",
        )
    length = environ.get("CONTENT_LENGTH")
    if length and length.isdigit() and int(length) > body_limit(settings):
        raise too_large(settings)
    raw = folder / "raw"
    raw.mkdir(parents=True)
    sink = _PartSink(raw, upload_limit(settings))
    parser = FormDataParser(
        stream_factory=sink,  # type: ignore[arg-type]
        max_form_memory_size=MAX_FIELD_BYTES,
        max_content_length=body_limit(settings),
        max_form_parts=MAX_PARTS,
        silent=False,
    )
    try:
        _, form, files = parser.parse_from_environ(environ)
    except RequestEntityTooLarge:
        raise too_large(settings) from None
    except ValueError:
        raise RequestError(
            400,
            "INCOMPLETE_UPLOAD",
            "The upload ended early or is not valid multipart data.",
            "Send the file again.",
        ) from None
    finally:
        sink.close()
    kept = {Path(part.stream.path) for part in files.getlist(FILE_FIELD)}  # type: ignore[attr-defined]
    for part in sink.parts:
        if part.path not in kept:
            part.path.unlink(missing_ok=True)
    ordered = [part.path for part in sink.parts if part.path in kept]
    return Received(form=form, files=ordered, size=sink.received)


def extract_zip(archive: Path, folder: Path, settings: Settings) -> Path:
    """Unpack ``archive`` into ``folder/extract/`` (returned) and remove it; refuse what is unsafe or broken."""
    extracted = folder / "extract"
    extracted.mkdir()
    limits = ZipLimits(max_total_bytes=settings.max_unzipped_mb * MB)
    try:
        safe_extract(archive, extracted, limits)
    except UnsafeArchive as exc:
        raise RequestError(
            422,
            "UNSAFE_ARCHIVE",
            f"The zip is refused: {exc}.",
            "Send a plain zip of one series: no links, no paths outside it, no zip bombs.",
        ) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError):
        raise RequestError(
            415,
            "INVALID_FORMAT",
            "The zip cannot be read (damaged or an unsupported method).",
            "Create the zip again with a standard tool.",
        ) from None
    archive.unlink()
    return extracted
