"""What ``openmsk segment`` (and the web upload) accept: a DICOM folder, a zip of one, a NIfTI or an NRRD file."""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pydicom

from openmsk.archive import UnsafeArchive, safe_extract
from worker.errors import SeriesError
from worker.t2.echoes import load_series_with_echoes
from worker.volume import SeriesVolume, load_series, read_series

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")


def is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def load_volume_file(path: Path) -> SeriesVolume:
    """A NIfTI or NRRD volume in patient space (SimpleITK reads both in LPS)."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise SeriesError(
            f"{path.name} is not a readable NIfTI/NRRD volume: {exc}", "Check the file."
        ) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SeriesError(f"{path.name} is not a single-channel 3D volume", "Send one 3D knee MRI volume.")
    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)  # (z, y, x) → (x, y, z)
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    spacing = tuple(float(s) for s in image.GetSpacing())
    return SeriesVolume(image=array, affine_lps=affine, spacing=spacing, sources=[])  # type: ignore[arg-type]


def load_input(path: Path) -> SeriesVolume:
    """Load any accepted input; ``volume.sources`` is empty for NIfTI/NRRD (no DICOM outputs then)."""
    if not path.exists():
        raise SeriesError(f"{path} does not exist", "Check the path.")
    if path.is_dir():
        return load_series_with_echoes(read_series(path))  # one echo: load_series
    if is_volume_file(path):
        return load_volume_file(path)
    if zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(prefix="openmsk-zip-") as tmp:
            try:
                safe_extract(path, Path(tmp))
            except UnsafeArchive as exc:
                raise SeriesError(str(exc), "Send a plain zip of one DICOM series.") from None
            volumes = [p for p in Path(tmp).rglob("*") if p.is_file() and is_volume_file(p)]
            if len(volumes) == 1:
                return load_volume_file(volumes[0])
            return load_series_with_echoes(read_series(Path(tmp)))
    try:
        return load_series([pydicom.dcmread(path)])  # one file: an enhanced (multi-frame) MR instance
    except pydicom.errors.InvalidDicomError:
        raise SeriesError(
            f"{path.name} is neither DICOM, a zip, NIfTI nor NRRD",
            "Send a DICOM folder/zip, .nii(.gz) or .nrrd.",
        ) from None


def load_series_instances(folder: Path, sop_uids: list[str]) -> SeriesVolume:
    """The volume of exactly the instances a job names: a series folder may gain files after its job was made."""
    missing = [uid for uid in sop_uids if not (folder / f"{uid}.dcm").is_file()]
    if missing:
        raise SeriesError(
            f"{len(missing)} of the job's {len(sop_uids)} instances are no longer on disk",
            "Send the series again.",
        )
    return load_series_with_echoes([pydicom.dcmread(folder / f"{uid}.dcm") for uid in sop_uids])
