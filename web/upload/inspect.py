"""Inspecting an upload: what the received files are, which of them to keep, and where they go.

What a file is comes from its content, never from the name the client gave it; that name is never used on
disk, and files are inspected by their headers only (DICOM without pixel data, the NIfTI/NRRD header).
Accepted: one zip of a DICOM series (any file names, extension-less files too), one NIfTI (``.nii`` or
``.nii.gz``) or single-file NRRD volume, one multi-frame DICOM, or several DICOM files in one request.

What lands on disk, under ``DATA_DIR/uploads/<job id>/``:

- DICOM: ``dicom/000001.dcm`` … (only the image instances of the one series, numbered in SOP Instance UID
  order, flat); ``input_path = uploads/<id>/dicom``.
- NIfTI: ``volume.nii.gz`` or ``volume.nii``; NRRD: ``volume.nrrd``; ``input_path`` names that file.

Every refusal is a :class:`~web.errors.RequestError` with a 4xx status and a hint, listing the series when
the upload holds several.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.errors import InvalidDicomError

from openmsk.config import Settings
from web.errors import RequestError
from web.upload.receive import FILE_FIELD, extract_zip

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"

Kind = Literal["dicom", "nifti", "nrrd"]
_VOLUME_NAMES = {"nii": "volume.nii", "nii.gz": "volume.nii.gz", "nrrd": "volume.nrrd"}


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
        except (OSError, EOFError, zlib.error):  # a damaged deflate stream is zlib.error, not OSError
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
    files: dict[str, str] = field(default_factory=dict)  # DICOM: SOP Instance UID -> file name in ``name``


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
    files: dict[str, str] = {}
    for number, item in enumerate(sorted(picked, key=lambda i: i.sop_uid), start=1):
        name = f"{number:06d}.dcm"
        os.replace(item.path, target / name)
        files.setdefault(item.sop_uid, name)  # two files of one instance: the archive needs it once
    return StoredInput(
        name=target.name,
        kind="dicom",
        study_uid=picked[0].study_uid,
        series_uid=picked[0].series_uid,
        sop_uids=sorted(i.sop_uid for i in picked),
        files=files,
    )


def _store_volume(folder: Path, path: Path, kind: str) -> StoredInput:
    target = folder / _VOLUME_NAMES[kind]
    os.replace(path, target)
    return StoredInput(name=target.name, kind="nrrd" if kind == "nrrd" else "nifti")


def _from_zip(folder: Path, archive: Path, settings: Settings, chosen: str | None) -> StoredInput:
    extracted = extract_zip(archive, folder, settings)
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
