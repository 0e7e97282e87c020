"""Small synthetic MR series written with pydicom, for the SCP's tests and its ingest benchmark.

The phantom (:mod:`openmsk.phantom`) makes anatomically meaningful knees; this makes whatever the SCP must
cope with — any size, count, modality, transfer syntax, and deliberately odd attributes — quickly. No patient
data: names and IDs are fixed placeholders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def mr_dataset(
    index: int,
    study_uid: str,
    series_uid: str,
    pixels: bytes,
    rows: int,
    columns: int,
    *,
    modality: str = "MR",
    body_part: str | None = "KNEE",
    acquisition: str | None = "3D",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    description: str = "PD SPACE SAG",
    sop_class: str = MRImageStorage,
) -> Dataset:
    """One instance (slice ``index``) of a synthetic series, with file meta for Explicit VR Little Endian."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = "20240101"
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYNTH0001"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if acquisition is not None:
        ds.MRAcquisitionType = acquisition
    ds.SliceThickness = "1.0"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0, 0, float(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = generate_uid()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_mr_series(
    out_dir: Path,
    count: int,
    rows: int = 32,
    columns: int = 32,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
    **attributes: object,
) -> list[Path]:
    """Write ``count`` instances of one series as ``out_dir/IMxxxx.dcm``; returns the paths in slice order.

    Pixels are 12-bit noise in 16-bit words (a plain image for every codec). ``attributes`` go to
    :func:`mr_dataset` (modality, body_part, acquisition, image_type, description, sop_class).
    """
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 4096, (rows, columns), dtype=np.uint16).tobytes()
        ds = mr_dataset(index, study_uid, series_uid, pixels, rows, columns, **attributes)  # type: ignore[arg-type]
        path = out_dir / f"IM{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
