"""Loading DICOM series into patient space, and refusing what is not a 3D volume."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from openmsk.phantom import generate, write_series
from worker.errors import GeometryError, SeriesError
from worker.inputs import load_input
from worker.volume import load_series, read_series


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    write_series(generate(seed=11, size="small", orientation="oblique", laterality="L"), out)
    return out


@pytest.mark.parametrize("orientation", ["sagittal", "coronal", "axial", "oblique"])
@pytest.mark.parametrize("laterality", ["R", "L"])
def test_volume_matches_phantom_in_patient_space(tmp_path: Path, orientation: str, laterality: str) -> None:
    ph = generate(seed=5, size="small", orientation=orientation, laterality=laterality)
    write_series(ph, tmp_path)
    files = sorted((tmp_path / "dicom").iterdir())
    # Shuffle the read order: slice order must come from geometry, not from file names.
    datasets = [pydicom.dcmread(p) for p in files[::-2] + files[::2]]
    volume = load_series(datasets)
    assert volume.image.shape == ph.image.shape
    np.testing.assert_allclose(volume.affine_lps, ph.affine_lps, atol=1e-3)
    np.testing.assert_array_equal(volume.image, ph.image.astype(np.float32))
    assert [int(ds.InstanceNumber) for ds in volume.sources] == sorted(
        int(ds.InstanceNumber) for ds in datasets
    )


def test_missing_slice_is_refused(phantom_dir: Path) -> None:
    datasets = read_series(phantom_dir / "dicom")
    with pytest.raises(SeriesError, match="uneven slice spacing"):
        load_series(datasets[:10] + datasets[11:])


def test_mixed_orientations_are_refused(phantom_dir: Path) -> None:
    datasets = read_series(phantom_dir / "dicom")
    datasets[3].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    with pytest.raises(GeometryError, match="mixes slice orientations"):
        load_series(datasets)


def test_localizer_is_refused(phantom_dir: Path) -> None:
    datasets = read_series(phantom_dir / "dicom")
    for ds in datasets:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    with pytest.raises(GeometryError, match="localizer"):
        load_series(datasets)
    with pytest.raises(GeometryError, match="2D image or localizer"):
        load_series(read_series(phantom_dir / "dicom")[:1])


def test_two_series_are_refused(phantom_dir: Path) -> None:
    datasets = read_series(phantom_dir / "dicom")
    datasets[0].SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(SeriesError, match="one series"):
        load_series(datasets)


def _as_layout(ds: pydicom.Dataset, layout: str, k: int) -> None:
    """Rewrite slice *ds* (16-bit unsigned, values < 4096) in another pixel layout that scanners use."""
    values = ds.pixel_array.astype(np.int32)
    if layout == "signed":
        ds.PixelRepresentation = 1
        ds.PixelData = (values - 2000).astype("<i2").tobytes()
    elif layout == "12_of_16_bits":
        ds.BitsStored, ds.HighBit = 12, 11
    elif layout == "12_of_16_bits_high_bits_set" and k == 3:
        ds.BitsStored, ds.HighBit = 12, 11
        values[0, :5] |= 0xF000  # garbage above the stored bits: pydicom's decoder decides what it means
        ds.PixelData = values.astype("<u2").tobytes()
    elif layout == "signed_12_of_16_bits":
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 12, 11
        # 12-bit two's complement with the unused high bits zero: pydicom extends the sign from bit 11
        ds.PixelData = (((values % 4096) - 2048) & 0x0FFF).astype("<u2").tobytes()
    elif layout == "8_bits":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = (values // 16).astype(np.uint8).tobytes()
    elif layout == "implicit_vr":
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    elif layout == "big_endian":
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
        ds.PixelData = values.astype(">u2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = (2.5, -100) if k % 2 else (1, 0)


@pytest.mark.parametrize(
    "layout",
    [
        "as_written",
        "signed",
        "12_of_16_bits",
        "12_of_16_bits_high_bits_set",
        "signed_12_of_16_bits",
        "8_bits",
        "implicit_vr",
        "big_endian",
    ],
)
def test_pixel_values_are_pydicoms_rescaled(phantom_dir: Path, layout: str) -> None:
    """Uncompressed slices are read from their bytes, the rest by pydicom's decoder: either way the voxels
    are pydicom's values with the rescale applied, in float32."""
    datasets = read_series(phantom_dir / "dicom")
    for k, ds in enumerate(datasets):
        _as_layout(ds, layout, k)
    volume = load_series(datasets)
    for k, ds in enumerate(volume.sources):
        expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.image[:, :, k], expected.T, err_msg=f"slice {k}")


def test_compressed_series_is_decoded(phantom_dir: Path, tmp_path: Path) -> None:
    """JPEG-LS lossless via dcmtk's dcmcjpls, decoded through the pylibjpeg plugins."""
    reference = load_series(read_series(phantom_dir / "dicom"))
    out = tmp_path / "jls"
    out.mkdir()
    for path in sorted((phantom_dir / "dicom").iterdir()):
        subprocess.run(["dcmcjpls", str(path), str(out / path.name)], check=True, env={"TCP_NODELAY": "1"})
    assert pydicom.dcmread(next(out.iterdir())).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    volume = load_series(read_series(out))
    np.testing.assert_array_equal(volume.image, reference.image)


def test_enhanced_multiframe_mr_is_accepted(phantom_dir: Path, tmp_path: Path) -> None:
    reference = load_series(read_series(phantom_dir / "dicom"))
    first = reference.sources[0]
    enhanced = pydicom.Dataset()
    enhanced.file_meta = pydicom.dataset.FileMetaDataset()
    enhanced.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    enhanced.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    enhanced.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    enhanced.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    enhanced.SOPInstanceUID = enhanced.file_meta.MediaStorageSOPInstanceUID
    for tag in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
    ):
        setattr(enhanced, tag, getattr(first, tag))
    frames = list(reversed(reference.sources))  # frame order must not matter
    enhanced.NumberOfFrames = len(frames)
    shared = pydicom.Dataset()
    measures = pydicom.Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    shared.PixelMeasuresSequence = [measures]
    plane = pydicom.Dataset()
    plane.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PlaneOrientationSequence = [plane]
    enhanced.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for ds in frames:
        item, position = pydicom.Dataset(), pydicom.Dataset()
        position.ImagePositionPatient = ds.ImagePositionPatient
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    enhanced.PerFrameFunctionalGroupsSequence = per_frame
    enhanced.PixelData = b"".join(ds.PixelData for ds in frames)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)

    volume = load_input(path)
    np.testing.assert_allclose(volume.affine_lps, reference.affine_lps, atol=1e-3)
    np.testing.assert_array_equal(volume.image, reference.image)


def test_nifti_input_keeps_patient_space(phantom_dir: Path) -> None:
    """labels.nii.gz (RAS affine) read back as a volume lands on the DICOM geometry (LPS)."""
    reference = load_series(read_series(phantom_dir / "dicom"))
    volume = load_input(phantom_dir / "labels.nii.gz")
    np.testing.assert_allclose(volume.affine_lps, reference.affine_lps, atol=1e-3)
    assert volume.image.shape == reference.image.shape and volume.sources == []
