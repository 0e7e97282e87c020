"""DICOM writer for phantoms: one MR Image Storage file per slice, full geometry, DESS-like MR attributes.

UIDs are ``2.25.<name-based UUID>`` derived from the seed (pydicom's ``generate_uid(prefix=None)`` ignores its
entropy sources and is random, so it cannot give repeatable UIDs). The study and frame of reference depend on
(seed, laterality) only: every size and orientation of one knee shares one patient space, so they share one
frame of reference; each series differs by size and orientation.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage

from openmsk import __version__

if TYPE_CHECKING:
    from openmsk.phantom import Phantom
    from openmsk.phantom.anatomy import Grid

# Fixed namespace: the same names always map to the same UUIDs, in every install.
_UID_NAMESPACE = uuid.UUID("5f0c2b8e-6d1a-4c3e-9a57-0a8e3c1d2b44")

_SERIES_DESCRIPTION = {
    "sagittal": "SAG 3D DESS WE",
    "coronal": "COR 3D DESS WE",
    "axial": "AX 3D DESS WE",
    "oblique": "SAG OBL 3D DESS WE",
}
_SERIES_NUMBER = {"sagittal": 3, "coronal": 4, "axial": 5, "oblique": 6}
# Clinical knee DESS at 3 T (as in the Osteoarthritis Initiative protocol).
_TR_MS, _TE_MS, _FLIP_DEG, _FIELD_T = 16.3, 4.7, 25.0, 3.0


def phantom_uid(*parts: object) -> str:
    """A repeatable DICOM UID from *parts* (ISO/IEC 9834-8 name-based UUID under the 2.25 root)."""
    name = "openmsk-phantom/" + "/".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _patient(seed: int, visit: int = 0) -> dict[str, str]:
    """A synthetic patient for *seed*: name, ID, birth date, sex, and a study date they were scanned on
    (*visit* years after the baseline visit; the time of day is the same)."""
    rng = np.random.default_rng([seed, 4])  # stream 4: demographics
    birth = dt.date(int(rng.integers(1945, 2001)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    study = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 366)) + 365 * visit)
    age = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    return {
        "name": f"PHANTOM^KNEE{seed}",
        "id": f"OMSKPH{seed:06d}",
        "birth_date": birth.strftime("%Y%m%d"),
        "sex": "F" if rng.random() < 0.5 else "M",
        "age": f"{age:03d}Y",
        "study_date": study.strftime("%Y%m%d"),
        "study_time": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
    }


def series_meta(
    seed: int, size: str, orientation: str, laterality: str, grid: Grid, *, visit: int = 0
) -> dict[str, Any]:
    """Identity of one phantom series: UIDs, patient, and the grid directions written to DICOM.

    A later *visit* is a new study of the same patient: every UID differs from the baseline's (the baseline
    keeps the UIDs it always had), the patient is the same.
    """
    nz = grid.shape[2]
    # Visit 0 names its UIDs without a visit part, so baseline UIDs stay what they were before visits existed.
    key: tuple[object, ...] = (seed, laterality) if visit == 0 else (seed, laterality, "visit", visit)
    uids = {
        "study": phantom_uid(*key, "study"),
        "frame_of_reference": phantom_uid(*key, "frame"),
        "series": phantom_uid(*key, size, orientation, "series"),
        "sop_instances": [phantom_uid(*key, size, orientation, "sop", k) for k in range(nz)],
    }
    return {
        "visit": visit,
        "seed": seed,
        "size": size,
        "orientation": orientation,
        "laterality": laterality,
        "uids": uids,
        "patient": _patient(seed, visit),
        "series_description": _SERIES_DESCRIPTION[orientation],
        "series_number": _SERIES_NUMBER[orientation],
        "row_direction": grid.row_dir.tolist(),
        "column_direction": grid.col_dir.tolist(),
        "slice_direction": grid.normal.tolist(),
    }


def _ds_number(value: float) -> str:
    """The most precise decimal string that fits DS's 16 characters, so geometry survives the round trip."""
    for decimals in range(12, -1, -1):
        text = f"{value:.{decimals}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        if len(text) <= 16:
            return "0" if text == "-0" else text
    raise ValueError(f"{value!r} does not fit a DICOM decimal string")


def _base_dataset(phantom: Phantom) -> dict[str, Any]:
    """Attributes shared by every slice of the series."""
    meta = phantom.meta
    pat = meta["patient"]
    nx, ny, _ = phantom.image.shape
    sx, sy, sz = phantom.spacing
    row_dir = np.asarray(meta["row_direction"])
    col_dir = np.asarray(meta["column_direction"])
    image = phantom.image
    centre = float(np.percentile(image[:, :, image.shape[2] // 2], 99)) / 2.0
    return {
        # SOP Common
        "SOPClassUID": MRImageStorage,
        "SpecificCharacterSet": "ISO_IR 100",
        "InstanceCreationDate": pat["study_date"],
        "InstanceCreationTime": pat["study_time"],
        # Patient
        "PatientName": pat["name"],
        "PatientID": pat["id"],
        "PatientBirthDate": pat["birth_date"],
        "PatientSex": pat["sex"],
        "PatientAge": pat["age"],
        "PatientIdentityRemoved": "NO",
        # General Study
        "StudyInstanceUID": meta["uids"]["study"],
        "StudyDate": pat["study_date"],
        "StudyTime": pat["study_time"],
        "ReferringPhysicianName": "",
        "StudyID": str(meta.get("visit", 0) + 1),
        # each visit is its own order; the baseline keeps the number it always had
        "AccessionNumber": (f"PH{meta['seed']:08d}" + (f"V{meta['visit']}" if meta.get("visit") else ""))[
            :16
        ],
        "StudyDescription": "MRI KNEE PHANTOM",
        # General Series
        "Modality": "MR",
        "SeriesInstanceUID": meta["uids"]["series"],
        "SeriesNumber": meta["series_number"],
        "SeriesDate": pat["study_date"],
        "SeriesTime": pat["study_time"],
        "SeriesDescription": meta["series_description"],
        "ProtocolName": meta["series_description"],
        "Laterality": meta["laterality"],
        "BodyPartExamined": "KNEE",
        "PatientPosition": "FFS",
        # Frame of Reference
        "FrameOfReferenceUID": meta["uids"]["frame_of_reference"],
        "PositionReferenceIndicator": "",
        # General Equipment
        "Manufacturer": "OpenMSK",
        "ManufacturerModelName": "Synthetic Knee Phantom",
        "DeviceSerialNumber": "0",
        "SoftwareVersions": __version__,
        "InstitutionName": "OpenMSK Phantom",
        "StationName": "PHANTOM",
        # General Acquisition / Image
        "AcquisitionNumber": 1,
        "AcquisitionDate": pat["study_date"],
        "AcquisitionTime": pat["study_time"],
        "ContentDate": pat["study_date"],
        "ContentTime": pat["study_time"],
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
        "BurnedInAnnotation": "NO",
        # Image Plane
        "PixelSpacing": [_ds_number(sy), _ds_number(sx)],  # row spacing (between rows), column spacing
        "ImageOrientationPatient": [_ds_number(v) for v in (*row_dir, *col_dir)],
        "SliceThickness": _ds_number(sz),
        "SpacingBetweenSlices": _ds_number(sz),
        # Image Pixel
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": ny,
        "Columns": nx,
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 0,
        # MR Image
        "ScanningSequence": "GR",
        "SequenceVariant": ["SP", "SS"],
        "ScanOptions": "WE",
        "MRAcquisitionType": "3D",
        "SequenceName": "*de3d1",
        "AngioFlag": "N",
        "RepetitionTime": _ds_number(_TR_MS),
        "EchoTime": _ds_number(_TE_MS),
        "EchoTrainLength": 1,
        "NumberOfAverages": "1",
        "EchoNumbers": "1",
        "ImagingFrequency": "123.25",
        "ImagedNucleus": "1H",
        "MagneticFieldStrength": _ds_number(_FIELD_T),
        "FlipAngle": _ds_number(_FLIP_DEG),
        "PercentSampling": "100",
        "PercentPhaseFieldOfView": "100",
        "PixelBandwidth": "185",
        "ReceiveCoilName": "KNEE",
        "TransmitCoilName": "KNEE",
        "AcquisitionMatrix": [0, nx, ny, 0],
        "InPlanePhaseEncodingDirection": "ROW",
        # VOI LUT: a display window that shows cartilage and fluid well
        "WindowCenter": _ds_number(round(centre)),
        "WindowWidth": _ds_number(round(2 * centre)),
    }


def write_dicom_series(
    phantom: Phantom, dicom_dir: str | Path, amend: Callable[[FileDataset, int], None] | None = None
) -> list[Path]:
    """Write one ``IMnnnn.dcm`` per slice (InstanceNumber = slice index + 1, along the slice normal).

    *amend* (dataset, slice index) may change a slice before it is written (the multi-echo phantoms' echo
    attributes).
    """
    out = Path(dicom_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = phantom.meta
    base = _base_dataset(phantom)
    aff = phantom.affine_lps
    normal = np.asarray(meta["slice_direction"])
    nz = phantom.image.shape[2]
    width = max(4, len(str(nz)))
    paths: list[Path] = []
    for k in range(nz):
        sop_uid = meta["uids"]["sop_instances"][k]
        file_meta = FileMetaDataset()
        file_meta.MediaStorageSOPClassUID = MRImageStorage
        file_meta.MediaStorageSOPInstanceUID = sop_uid
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        file_meta.ImplementationVersionName = "OPENMSK_PHANTOM"
        path = out / f"IM{k + 1:0{width}d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=file_meta, preamble=b"\0" * 128)
        for keyword, value in base.items():
            setattr(ds, keyword, value)
        position = aff[:3, 3] + k * aff[:3, 2]
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds_number(v) for v in position]
        ds.SliceLocation = _ds_number(float(position @ normal))
        # Rows run along j and columns along i, so a slice's 2D pixel array is image[:, :, k] transposed.
        ds.PixelData = np.ascontiguousarray(phantom.image[:, :, k].T).astype("<u2").tobytes()
        if amend is not None:
            amend(ds, k)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
