"""Load a DICOM series into a volume in patient space.

Voxel index ``(i, j, k)`` = (column, row, slice): ``i`` runs along the DICOM row direction, ``j`` along the column
direction, ``k`` along the slice normal, ordered by position. ``affine_lps`` maps it to patient LPS millimetres,
so every later stage (inference, SEG, measurements) works for sagittal, coronal, axial and oblique series and for
either knee without special cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from worker.errors import GeometryError, SeriesError

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
# Uncompressed little-endian transfer syntaxes: the pixel data is the array's bytes (pydicom inflates Deflated
# data as it reads the file).
_NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
# Tolerances: scanner headers are rounded to ~6 significant digits.
ORIENTATION_TOL = 1e-3
SPACING_REL_TOL = 0.05


@dataclass
class SeriesVolume:
    """A 3D image with its geometry and the source instances it came from.

    ``image`` is indexed (i, j, k) but need not be C-contiguous (loaded series are a view of their slices).
    """

    image: np.ndarray
    affine_lps: np.ndarray
    spacing: tuple[float, float, float]
    sources: list[Dataset] = field(repr=False)

    def __post_init__(self) -> None:
        if self.image.ndim != 3:
            raise ValueError(f"image must be 3D, got shape {self.image.shape}")
        if self.affine_lps.shape != (4, 4):
            raise ValueError("affine_lps must be 4x4")

    @property
    def series_uid(self) -> str:
        return str(self.sources[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.sources[0].StudyInstanceUID)


def read_series(folder: Path) -> list[Dataset]:
    """Every DICOM instance under ``folder`` (recursively; files that are not DICOM are skipped)."""
    datasets = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            datasets.append(pydicom.dcmread(path))
        except (pydicom.errors.InvalidDicomError, OSError, EOFError):
            continue
    if not datasets:
        raise SeriesError(
            f"no DICOM instances found in {folder.name}", "Check that the upload holds DICOM files."
        )
    return datasets


def load_series(datasets: Sequence[Dataset]) -> SeriesVolume:
    """Turn the instances of one series into a :class:`SeriesVolume`, refusing what cannot be a 3D volume."""
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) != 1:
        raise SeriesError(f"expected one series, got {len(series)}", "Send one series per job.")
    if len(datasets) == 1 and datasets[0].SOPClassUID == ENHANCED_MR:
        return _load_enhanced(datasets[0])
    return _load_single_frames(list(datasets))


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _check_not_localizer(datasets: Sequence[Dataset]) -> None:
    image_type = [str(v).upper() for v in datasets[0].get("ImageType", [])]
    if "LOCALIZER" in image_type:
        raise GeometryError(
            "the series is a localizer (ImageType LOCALIZER)", "Send the 3D knee series instead."
        )
    if len(datasets) < 3:
        raise GeometryError(
            f"the series has {len(datasets)} slice(s): a 2D image or localizer, not a 3D volume",
            "Send the 3D knee series instead.",
        )


def _geometry(
    orientation: Sequence[float], positions: np.ndarray, pixel_spacing: Sequence[float]
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Sort slices along the normal, check even spacing; return (order, spacing, affine)."""
    row_dir, col_dir = _unit(np.array(orientation[:3], float)), _unit(np.array(orientation[3:], float))
    normal = np.cross(row_dir, col_dir)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    gaps = np.diff(distances[order])
    if np.any(gaps < 1e-3):
        raise SeriesError("two instances share one slice position (duplicates or several echoes/phases)")
    step = float(np.median(gaps))
    if np.any(np.abs(gaps - step) > SPACING_REL_TOL * step):
        worst = float(np.max(np.abs(gaps - step)))
        raise SeriesError(
            f"uneven slice spacing (median {step:.3f} mm, off by up to {worst:.3f} mm): slices are missing",
            "Send the complete series again; all slices must arrive before the job runs.",
        )
    # Positions must lie on the normal through the first slice: a sheared stack is not a volume.
    first = positions[order[0]]
    offsets = positions[order] - first - np.outer(distances[order] - distances[order[0]], normal)
    if np.max(np.abs(offsets)) > 0.5 * min(float(pixel_spacing[0]), float(pixel_spacing[1])):
        raise GeometryError("slices are shifted in-plane against each other (gantry tilt or sheared stack)")
    row_spacing, col_spacing = float(pixel_spacing[0]), float(pixel_spacing[1])
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing  # i: along a row, steps of the column spacing
    affine[:3, 1] = col_dir * row_spacing  # j: down a column, steps of the row spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = first
    return order, (col_spacing, row_spacing, step), affine


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """The stored values of an uncompressed single-frame greyscale slice, read straight from its bytes; ``None``
    where pydicom's decoder is needed.

    pydicom's ``pixel_array`` validates its options and picks a decoder on every call: about 1.5 ms a slice,
    a third of loading a full-size series. For native little-endian data it reads the same bytes; whatever
    it would have to interpret (compression, colour, several frames, bits beyond the stored ones) goes to it.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _NATIVE_SYNTAXES or "PixelData" not in ds:
        return None
    try:
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        rows, columns = int(ds.Rows), int(ds.Columns)
        single = int(ds.get("SamplesPerPixel", 1)) == 1 and int(ds.get("NumberOfFrames", 1) or 1) == 1
    except (AttributeError, TypeError, ValueError):
        return None
    data = ds.PixelData
    if not single or allocated not in (8, 16, 32) or not 0 < stored <= allocated:
        return None
    if signed and stored < allocated:  # needs sign extension from the stored bits
        return None
    if not isinstance(data, bytes) or len(data) < rows * columns * allocated // 8:
        return None
    kind = "i" if signed else "u"
    pixels = np.frombuffer(data, dtype=f"<{kind}{allocated // 8}", count=rows * columns).reshape(
        rows, columns
    )
    if stored < allocated and int(pixels.max()) >> stored:  # unused high bits set
        return None
    return pixels


def _decoded_pixels(ds: Dataset) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:
        raise SeriesError(
            f"pixel data of instance {ds.get('SOPInstanceUID', '?')} cannot be decoded: {exc}",
            "The transfer syntax may be unsupported; send it uncompressed or JPEG/JPEG-LS/JPEG 2000/RLE.",
        ) from None


def _fill_slice(out: np.ndarray, ds: Dataset) -> None:
    """Write the rescaled values (RescaleSlope, RescaleIntercept) of slice *ds* into the float32 array *out*."""
    pixels = _native_pixels(ds)
    out[...] = _decoded_pixels(ds) if pixels is None else pixels
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        out *= slope
    if intercept != 0.0:
        out += intercept


def _load_single_frames(datasets: list[Dataset]) -> SeriesVolume:
    _check_not_localizer(datasets)
    missing = [
        t for t in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing") if t not in datasets[0]
    ]
    if missing:
        raise GeometryError(f"the series lacks {', '.join(missing)}: its geometry is unknown")
    orientation = np.array(datasets[0].ImageOrientationPatient, float)
    for ds in datasets:
        if (
            "ImageOrientationPatient" not in ds
            or np.max(np.abs(np.array(ds.ImageOrientationPatient, float) - orientation)) > ORIENTATION_TOL
        ):
            raise GeometryError(
                "the series mixes slice orientations", "Send a series acquired in one orientation."
            )
        if (ds.Rows, ds.Columns) != (datasets[0].Rows, datasets[0].Columns):
            raise GeometryError("the series mixes image sizes")
    positions = np.array([ds.ImagePositionPatient for ds in datasets], float)
    order, spacing, affine = _geometry(orientation, positions, datasets[0].PixelSpacing)
    sources = [datasets[i] for i in order]
    # Slices are filled one after the other into a (k, j, i) buffer (pixel_array is (rows, cols) = (j, i)) and
    # the volume is its (i, j, k) view: writing slices into an (i, j, k) array strides through all of memory
    # and took longer than reading the files.
    stack = np.empty((len(sources), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=np.float32)
    for k, ds in enumerate(sources):
        _fill_slice(stack[k], ds)
    return SeriesVolume(image=stack.transpose(2, 1, 0), affine_lps=affine, spacing=spacing, sources=sources)


def _load_enhanced(ds: Dataset) -> SeriesVolume:
    """Enhanced (multi-frame) MR: geometry per frame from the functional groups."""
    frames = int(ds.get("NumberOfFrames", 1))
    if frames < 3:
        raise GeometryError(f"the enhanced MR instance has {frames} frame(s), not a 3D volume")
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.PerFrameFunctionalGroupsSequence

    def item(frame: Dataset, name: str) -> Dataset:
        if name in frame:
            return frame[name][0]
        if name in shared:
            return shared[name][0]
        raise GeometryError(f"the enhanced MR instance lacks {name}: its geometry is unknown")

    orientations = np.array(
        [item(f, "PlaneOrientationSequence").ImageOrientationPatient for f in per_frame], float
    )
    if np.max(np.abs(orientations - orientations[0])) > ORIENTATION_TOL:
        raise GeometryError(
            "the series mixes slice orientations", "Send a series acquired in one orientation."
        )
    positions = np.array([item(f, "PlanePositionSequence").ImagePositionPatient for f in per_frame], float)
    spacing_item = item(per_frame[0], "PixelMeasuresSequence")
    order, spacing, affine = _geometry(orientations[0], positions, spacing_item.PixelSpacing)
    pixels = ds.pixel_array.astype(np.float32)
    transform = (
        item(per_frame[0], "PixelValueTransformationSequence")
        if (
            "PixelValueTransformationSequence" in per_frame[0] or "PixelValueTransformationSequence" in shared
        )
        else None
    )
    if transform is not None:
        pixels = pixels * float(transform.get("RescaleSlope", 1)) + float(
            transform.get("RescaleIntercept", 0)
        )
    # frames are (k, j, i); the volume is the (i, j, k) view of them in slice order
    return SeriesVolume(
        image=pixels[order].transpose(2, 1, 0), affine_lps=affine, spacing=spacing, sources=[ds]
    )
