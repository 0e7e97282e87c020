"""Uploads: stream the request body to disk, find out what it is, keep one series or volume, queue a job.

Accepted: one zip of a DICOM series (any file names, extension-less files too), one NIfTI (``.nii`` or
``.nii.gz``) or single-file NRRD volume, one multi-frame DICOM, or several DICOM files in one request. What
a file is comes from its content, never from the name the client gave it; that name is never used on disk.

What lands on disk, under ``DATA_DIR/uploads/<job id>/``:

- DICOM: ``dicom/000001.dcm`` … (only the image instances of the one series);
  ``input_path = uploads/<id>/dicom``.
- NIfTI: ``volume.nii.gz`` or ``volume.nii``; NRRD: ``volume.nrrd``; ``input_path`` names that file.

Every refusal is a :class:`~web.errors.RequestError` with a 4xx status and removes the upload folder, so a
refused upload leaves nothing behind. The body is never held in memory: multipart parts stream into files in
the upload folder (waitress buffers the raw body under ``DATA_DIR/tmp`` first, see ``web.server``), and
files are inspected by their headers only.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import pydicom
import redis
from dramatiq.brokers.redis import RedisBroker
from pydicom.errors import InvalidDicomError
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

from openmsk.archive import UnsafeArchive, ZipLimits, safe_extract
from openmsk.config import Settings
from openmsk.jobs import ErrorCode, Job, JobState, JobStore
from openmsk.models.registry import RegistryError, model_statuses
from openmsk.queue import enqueue_job
from web.errors import RequestError

log = logging.getLogger("openmsk.web.upload")

MB = 1024 * 1024
FILE_FIELD = "file"
MAX_PARTS = 10_000  # several .dcm files: a long series has a few thousand instances
MAX_FIELD_BYTES = MB  # form fields; also bounds the parser's buffer, which reads 64 KB at a time
MULTIPART_OVERHEAD = 4 * MB  # part headers and boundaries on top of the file bytes
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"

Kind = Literal["dicom", "nifti", "nrrd"]
_VOLUME_NAMES = {"nii": "volume.nii", "nii.gz": "volume.nii.gz", "nrrd": "volume.nrrd"}


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


def uploads_root(settings: Settings) -> Path:
    return settings.data_path / "uploads"


# ----------------------------------------------------------------------------------------------- receiving


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


# ----------------------------------------------------------------------------------------------- sniffing


@dataclass(frozen=True)
class Instance:
    """The header facts of one DICOM image instance (read without pixel data)."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    frames: int
    modality: str
    description: str
    number: str


def _head(path: Path, size: int = 1024) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def _nifti_shape(header: bytes) -> tuple[int, ...] | None:
    """The data shape of a NIfTI-1/2 header (either byte order), or ``None`` when it is not one."""
    import nibabel as nib

    for klass, magic_at, magic in ((nib.Nifti1Header, 344, b"n+1\x00"), (nib.Nifti2Header, 4, b"n+2\x00")):
        if header[magic_at : magic_at + 4] != magic:
            continue
        try:
            return tuple(klass.from_fileobj(io.BytesIO(header), check=True).get_data_shape())
        except Exception:  # nibabel raises several types for a broken header
            return None
    return None


def _nrrd_header(path: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    with open(path, "rb") as handle:
        handle.readline()  # NRRD000X
        for _ in range(200):
            line = handle.readline(4096).decode("latin-1").strip()
            if not line:
                break
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.lstrip("=").strip()
    return fields


def volume_kind(path: Path) -> str | None:
    """``"nii"``, ``"nii.gz"`` or ``"nrrd"`` when ``path`` holds such a volume (by content), else ``None``.

    Raises :class:`RequestError` for a volume the worker could not use (not 3D, detached NRRD data).
    """
    head = _head(path, 560)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as handle:
                head, kind = handle.read(560), "nii.gz"
        except (OSError, EOFError):
            return None
    elif head.startswith(b"NRRD000"):
        fields = _nrrd_header(path)
        if "data file" in fields or "datafile" in fields:
            raise RequestError(
                415,
                "INVALID_FORMAT",
                "The NRRD header points to a separate data file.",
                "Send a single-file .nrrd (header and data in one file).",
            )
        if fields.get("dimension") != "3":
            raise RequestError(
                422, "NOT_A_VOLUME", "The NRRD file is not a 3D volume.", "Send one 3D knee MRI."
            )
        return "nrrd"
    else:
        kind = "nii"
    shape = _nifti_shape(head)
    if shape is None:
        return None
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape[:3]) < 2:
        raise RequestError(
            422,
            "NOT_A_VOLUME",
            f"The NIfTI file has shape {shape}, not a 3D volume.",
            "Send one 3D knee MRI volume.",
        )
    return kind


def dicom_instance(path: Path) -> Instance | None:
    """The header of a DICOM image instance, or ``None`` for anything else (DICOMDIR, non-images...)."""
    if _head(path, 132)[128:132] != b"DICM":
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
        return None
    if (
        str(ds.get("SOPClassUID", "")) == DICOMDIR_CLASS
        or "Rows" not in ds
        or not ds.get("SeriesInstanceUID")
    ):
        return None
    return Instance(
        path=path,
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "")),
        number=str(ds.get("SeriesNumber", "")),
    )


# ----------------------------------------------------------------------------------------------- storing


@dataclass
class StoredInput:
    """What an accepted upload became on disk, and the DICOM identifiers the job record carries."""

    name: str  # in the upload folder: "dicom" or the volume file
    kind: Kind
    study_uid: str = ""
    series_uid: str = ""
    sop_uids: list[str] = field(default_factory=list)


def _files_under(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink())


def _not_recognised(what: str) -> RequestError:
    return RequestError(
        415,
        "INVALID_FORMAT",
        f"{what} neither DICOM nor a NIfTI/NRRD volume.",
        "Send a zip of one DICOM series, several .dcm files, a .nii/.nii.gz or a .nrrd volume.",
    )


def _series_summary(series: dict[str, list[Instance]]) -> list[dict[str, Any]]:
    return [
        {
            "series_uid": uid,
            "description": items[0].description,
            "modality": items[0].modality,
            "number": items[0].number,
            "instances": len(items),
        }
        for uid, items in sorted(series.items(), key=lambda kv: (kv[1][0].number.zfill(6), kv[0]))
    ]


def _choose_series(instances: list[Instance], chosen: str | None) -> list[Instance]:
    series: dict[str, list[Instance]] = {}
    for item in instances:
        series.setdefault(item.series_uid, []).append(item)
    if chosen:
        if chosen not in series:
            raise RequestError(
                422,
                "SERIES_NOT_FOUND",
                "The chosen series is not in this upload.",
                "Choose one of the listed series.",
                extra={"series": _series_summary(series)},
            )
        return series[chosen]
    if len(series) > 1:
        raise RequestError(
            422,
            "SEVERAL_SERIES",
            f"The upload holds {len(series)} series; the node segments one per job.",
            "Choose the series to segment and send the upload again with it (field 'series_uid').",
            extra={"series": _series_summary(series)},
        )
    return next(iter(series.values()))


def _store_dicom(folder: Path, instances: list[Instance], chosen: str | None) -> StoredInput:
    picked = _choose_series(instances, chosen)
    frames = sum(i.frames for i in picked)
    if frames < 3:
        raise RequestError(
            422,
            "NOT_A_VOLUME",
            f"The series has {len(picked)} image(s) with {frames} frame(s): not a 3D volume.",
            "Send every slice of the 3D knee series.",
        )
    target = folder / "dicom"
    target.mkdir()
    for number, item in enumerate(sorted(picked, key=lambda i: i.sop_uid), start=1):
        os.replace(item.path, target / f"{number:06d}.dcm")
    return StoredInput(
        name=target.name,
        kind="dicom",
        study_uid=picked[0].study_uid,
        series_uid=picked[0].series_uid,
        sop_uids=sorted(i.sop_uid for i in picked),
    )


def _store_volume(folder: Path, path: Path, kind: str) -> StoredInput:
    target = folder / _VOLUME_NAMES[kind]
    os.replace(path, target)
    return StoredInput(name=target.name, kind="nrrd" if kind == "nrrd" else "nifti")


def _from_zip(folder: Path, archive: Path, settings: Settings, chosen: str | None) -> StoredInput:
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
    instances, volumes = [], []
    for path in _files_under(extracted):
        instance = dicom_instance(path)
        if instance is not None:
            instances.append(instance)
            continue
        kind = volume_kind(path)
        if kind is not None:
            volumes.append((path, kind))
    if instances:
        return _store_dicom(folder, instances, chosen)
    if len(volumes) == 1:
        return _store_volume(folder, *volumes[0])
    if volumes:
        raise RequestError(
            422,
            "SEVERAL_VOLUMES",
            f"The zip holds {len(volumes)} volumes; send one per job.",
            "Zip only the volume to segment.",
        )
    raise _not_recognised("Nothing in the zip is")


def store_input(
    folder: Path, files: list[Path], settings: Settings, chosen: str | None = None
) -> StoredInput:
    """Decide what the received ``files`` are and arrange the accepted input in ``folder``.

    Scratch (``raw/``, ``extract/``) is removed; the caller removes the whole folder when this raises.
    """
    if not files:
        raise RequestError(
            400, "NO_FILE", "The upload holds no file.", f"Attach the file in the field '{FILE_FIELD}'."
        )
    if any(path.stat().st_size == 0 for path in files):
        raise RequestError(
            400, "EMPTY_FILE", "The uploaded file is empty.", "Choose the file again and resend it."
        )
    try:
        if len(files) == 1 and zipfile.is_zipfile(files[0]):
            return _from_zip(folder, files[0], settings, chosen)
        if len(files) == 1 and dicom_instance(files[0]) is None:
            kind = volume_kind(files[0])
            if kind is None:
                raise _not_recognised("The file is")
            return _store_volume(folder, files[0], kind)
        instances = []
        for number, path in enumerate(files, start=1):
            instance = dicom_instance(path)
            if instance is None:
                what = "The file is" if len(files) == 1 else f"File {number} of {len(files)} is"
                raise _not_recognised(what)
            instances.append(instance)
        return _store_dicom(folder, instances, chosen)
    finally:
        for scratch in ("raw", "extract"):
            shutil.rmtree(folder / scratch, ignore_errors=True)


def offered_models(settings: Settings) -> list[dict[str, Any]]:
    """The registry's models as ``/api/models`` lists them; 503 when the registry itself is unreadable."""
    try:
        return model_statuses(settings)
    except RegistryError as exc:
        raise RequestError(
            503,
            "NO_MODELS",
            f"The model registry cannot be read: {exc}",
            "Install a model: `openmsk models install` or `openmsk models train-demo`.",
        ) from None


def resolve_model(settings: Settings, requested: str | None) -> str:
    """The model a job will use: the one asked for (it must be offered and usable), else the default."""
    models = offered_models(settings)
    if not requested:
        requested = next((m["name"] for m in models if m["default"]), None)
        if requested is None:
            raise RequestError(
                503,
                "NO_MODELS",
                "No segmentation model is installed.",
                "Install one: `openmsk models install`.",
            )
    model = next((m for m in models if m["name"] == requested), None)
    if model is None:
        names = ", ".join(m["name"] for m in models) or "none"
        raise RequestError(
            400,
            "UNKNOWN_MODEL",
            f"There is no model called {requested!r}.",
            f"Choose one of: {names} (GET /api/models).",
        )
    if model["status"] != "ok":
        raise RequestError(
            409,
            "MODEL_UNAVAILABLE",
            f"Model {requested!r} cannot be used: {model['status']}",
            "Choose another model or repair this one (`openmsk models list`).",
        )
    return requested


def new_upload_folder(settings: Settings) -> tuple[str, Path]:
    """A fresh job id and its upload folder (created; the id is ours, never the client's)."""
    job_id = uuid.uuid4().hex
    folder = uploads_root(settings) / job_id
    folder.mkdir(parents=True)
    return job_id, folder


def submit(
    environ: dict[str, Any],
    settings: Settings,
    store: JobStore,
    broker: RedisBroker,
    check_form: Callable[[MultiDict[str, str]], None] | None = None,
) -> Job:
    """Receive one upload, store its input, create the job and queue it.

    ``check_form`` runs on the parsed form before anything is inspected (the pages check their CSRF field
    there). Any refusal removes the upload folder before the error propagates, so nothing is left behind.
    """
    job_id, folder = new_upload_folder(settings)
    try:
        received = receive(environ, settings, folder)
        if check_form is not None:
            check_form(received.form)
        model = resolve_model(settings, received.form.get("model"))
        stored = store_input(folder, received.files, settings, received.form.get("series_uid") or None)
        # Results go to Orthanc when there is one and the input is DICOM (a volume gives no DICOM results).
        destinations = ["orthanc"] if settings.orthanc_url and stored.kind == "dicom" else []
        job = Job(
            id=job_id,
            source="upload",
            model=model,
            input_path=str(folder.relative_to(settings.data_path) / stored.name),
            destinations=destinations,
            study_uid=stored.study_uid,
            series_uid=stored.series_uid,
            sop_uids=stored.sop_uids,
        )
        store.create(job)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    job = store.transition(job.id, JobState.QUEUED)
    try:
        enqueue_job(broker, job)
    except redis.RedisError:
        store.fail(job.id, ErrorCode.PIPELINE_ERROR, "the job could not be queued", "Upload the file again.")
        raise
    log.info(
        "upload %s queued: %s, %d bytes, %d instance(s), model %s",
        job_id,
        stored.kind,
        received.size,
        len(stored.sop_uids),
        model,
    )
    return job
