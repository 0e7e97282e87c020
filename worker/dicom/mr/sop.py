"""The image the node segmented and mapped T2 on, as a derived MR series in the source study.

Why it exists: a multi-echo series holds every echo at every slice position, and viewers open it as one stack
of all echoes. OHIF's parametric-map extension overlays a map on the stack its ReferencedSeriesSequence names
and expects one image per map frame; over a qDESS stack (two images per position) it fails. This series has
one image per slice — for qDESS the root-sum-of-squares of the echoes, for MESE echo 1, exactly the image the
SEG's labels and the map's values belong to — and the T2 map references it first (the echoes as further
sources), so a radiologist sees the map over it.

Each instance is the echo-1 instance of its slice with new UIDs, the node's equipment, ``DERIVED\\SECONDARY``,
a derivation description, its sources (every echo at that slice) and the image's pixels, uncompressed. Pixel
values are the source's own for MESE; qDESS sums are scaled down only where they would overflow the stored
bits (the factor is in DerivationDescription). UIDs are derived from (source series, model, version, T2
model, "t2-base"), so a rerun replaces the series in the PACS instead of adding a second one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from openmsk import __version__
from worker.dicom.general import MANUFACTURER, MANUFACTURER_MODEL_NAME, fit_text, save_dataset, series_number
from worker.dicom.mr.content import (
    IMAGE_TYPE,
    MR_SERIES_NUMBER_OFFSET,
    SOURCE_PURPOSE_CODE,
    derivation_description,
    series_description,
)
from worker.uids import derive_uid

if TYPE_CHECKING:
    from worker.t2.echoes import MultiEchoVolume

__all__ = ["DerivedSeries", "derived_mr_uids", "write_derived_mr"]

# What a copied echo-1 instance must not keep: it describes the scanner's file, not this image.
_DROPPED = (
    "EchoNumbers",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "SourceImageSequence",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
)


@dataclass(frozen=True)
class DerivedSeries:
    """What :func:`write_derived_mr` wrote: the series UID, its instances (slice order) and their paths."""

    series_uid: str
    sop_class_uid: str
    datasets: list[Dataset] = field(repr=False)
    paths: list[Path] = field(repr=False)

    @property
    def sop_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


def derived_mr_uids(
    source_series_uid: str, model_name: str, model_version: str, t2_model: str, n_slices: int
) -> tuple[str, list[str]]:
    """(SeriesInstanceUID, SOPInstanceUIDs in slice order) of the derived series of a source series."""
    parts = (source_series_uid, model_name, model_version, t2_model, "t2-base")
    return derive_uid(*parts, "series"), [derive_uid(*parts, "instance", str(k)) for k in range(n_slices)]


def _stored_range(source: Dataset) -> tuple[type[np.integer], int, int]:
    """(dtype, lowest, highest) the source's pixel module can store."""
    bits = int(source.get("BitsStored", 16) or 16)
    if int(source.get("PixelRepresentation", 0) or 0) == 1:
        return np.int16, -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.uint16, 0, (1 << bits) - 1


def write_derived_mr(
    volume: MultiEchoVolume,
    model_name: str,
    model_version: str,
    t2_model: str,
    out_dir: str | Path,
) -> DerivedSeries:
    """Write *volume*'s segmented image as a derived MR series, one file per slice (``t2_base_0001.dcm``, ...),
    in *out_dir*.

    Raises
    ------
    ValueError
        When the sources are not single-frame MR images, one per slice (the only layout a multi-echo
        series loads from), or the model is unnamed.
    """
    image = np.asarray(volume.image)
    n_slices = image.shape[2]
    if len(volume.sources) != n_slices or any(str(ds.SOPClassUID) != MRImageStorage for ds in volume.sources):
        raise ValueError("a derived MR series needs one single-frame MR image per slice")
    if not model_name or not model_version:
        raise ValueError("model_name and model_version must be non-empty")
    source0 = volume.sources[0]
    dtype, lowest, highest = _stored_range(source0)
    peak = float(np.nanmax(image)) if image.size else 0.0
    scale = 1.0 if peak <= highest else highest / peak
    pixels = np.clip(np.rint(np.nan_to_num(image) * scale), lowest, highest).astype(dtype)
    low, high = np.percentile(pixels, (0.5, 99.5)) if pixels.size else (0.0, 1.0)
    series_uid, sop_uids = derived_mr_uids(
        str(source0.SeriesInstanceUID), model_name, model_version, t2_model, n_slices
    )
    echoes_at = list(zip(*volume.echo_sources, strict=True)) if volume.echo_sources else []
    out = Path(out_dir)
    datasets, paths = [], []
    for k, (source, sop_uid) in enumerate(zip(volume.sources, sop_uids, strict=True)):
        ds = copy.deepcopy(source)
        ds.remove_private_tags()
        for keyword in _DROPPED:
            if keyword in ds:
                delattr(ds, keyword)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number(source0, MR_SERIES_NUMBER_OFFSET)
        ds.SeriesDescription = fit_text(series_description(volume.kind), 64)
        ds.InstanceNumber = k + 1
        ds.ImageType = IMAGE_TYPE
        ds.DerivationDescription = derivation_description(volume.kind, scale)
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = MANUFACTURER_MODEL_NAME
        ds.SoftwareVersions = __version__
        if volume.kind == "qdess":  # a sum of echoes has no one echo time (type 2: present, empty)
            ds.EchoTime = None
        ds.SourceImageSequence = [_source_item(echo) for echo in (echoes_at[k] if echoes_at else (source,))]
        ds.WindowCenter = f"{(low + high) / 2:.1f}"
        ds.WindowWidth = f"{max(high - low, 1.0):.1f}"
        frame = np.ascontiguousarray(pixels[:, :, k].T)  # (i, j) -> rows j, columns i
        ds.Rows, ds.Columns = frame.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = frame.tobytes()
        ds["PixelData"].VR = "OW"
        paths.append(save_dataset(ds, out / f"t2_base_{k + 1:04d}.dcm"))
        datasets.append(ds)
    return DerivedSeries(series_uid, MRImageStorage, datasets, paths)


def _source_item(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = SOURCE_PURPOSE_CODE
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item
