"""The SEG lands where the anatomy is: segment centroids, computed from the SEG file's own geometry, match the
phantom's true centroids within one voxel, for sagittal, coronal and axial acquisitions and both knees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from openmsk.labels import TISSUES
from openmsk.phantom import generate, write_series
from worker.dicom.seg import write_seg
from worker.volume import load_series, read_series


def segment_centroids(path: Path) -> dict[str, np.ndarray]:
    """Centroid (patient LPS mm) of every segment, from per-frame positions and the shared orientation/spacing."""
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    row_spacing, col_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    names = {int(s.SegmentNumber): s.SegmentLabel for s in ds.SegmentSequence}
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for frame, item in zip(pixels, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        origin = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        rows, cols = np.nonzero(frame)
        points = origin + np.outer(cols * col_spacing, row_dir) + np.outer(rows * row_spacing, col_dir)
        sums[number] = sums.get(number, np.zeros(3)) + points.sum(axis=0)
        counts[number] = counts.get(number, 0) + len(rows)
    return {names[n]: sums[n] / counts[n] for n in sums}


@pytest.mark.parametrize(("orientation", "laterality"), [("sagittal", "R"), ("coronal", "L"), ("axial", "R")])
def test_segment_centroids_match_truth(tmp_path: Path, orientation: str, laterality: str) -> None:
    ph = generate(seed=21, size="small", orientation=orientation, laterality=laterality)
    write_series(ph, tmp_path)
    volume = load_series(read_series(tmp_path / "dicom"))
    seg = write_seg(volume, ph.labels, "geometry-check", "1", tmp_path / "seg.dcm")
    found = segment_centroids(seg.path)
    voxel = float(np.linalg.norm(ph.spacing))
    by_display = {t.display_name: t.name for t in TISSUES.values()}
    assert len(found) == 9
    for label, centroid in found.items():
        name = by_display.get(label, label)
        truth = np.array(ph.truth["centroids_mm"][name])
        assert np.linalg.norm(centroid - truth) <= voxel, f"{name}: {centroid} vs {truth}"


@pytest.mark.parametrize(("orientation", "laterality"), [("coronal", "R"), ("oblique", "L")])
def test_region_segment_centroids_match_the_phantom_regions(
    tmp_path: Path, orientation: str, laterality: str
) -> None:
    """The region SEG's segments land on the phantom's own subregions (centroids in patient space)."""
    from openmsk.regions import REGIONS

    ph = generate(seed=21, size="small", orientation=orientation, laterality=laterality)
    assert ph.regions is not None
    write_series(ph, tmp_path)
    volume = load_series(read_series(tmp_path / "dicom"))
    seg = write_seg(volume, ph.regions, "geometry-check", "1", tmp_path / "rseg.dcm", regions=True)
    found = segment_centroids(seg.path)
    voxel = float(np.linalg.norm(ph.spacing))
    present = [int(v) for v in np.unique(ph.regions) if v]
    assert sorted(found) == sorted(REGIONS[v].display_name for v in present)
    for value in present:
        ijk = np.argwhere(ph.regions == value).mean(axis=0)
        truth = ph.affine_lps[:3, :3] @ ijk + ph.affine_lps[:3, 3]
        centroid = found[REGIONS[value].display_name]
        assert np.linalg.norm(centroid - truth) <= voxel, f"{REGIONS[value].name}: {centroid} vs {truth}"
