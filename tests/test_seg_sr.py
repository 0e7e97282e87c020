"""The DICOM outputs: SEG and SR, checked by independent readers, plus the tissue table and the preview.

A small oblique phantom (the most general geometry: rotated and anisotropic) is segmented "perfectly" (its own
labels) and written as SEG and SR. The SEG must pass dciodvfy, read back through dcmqi's segimage2itkimage
equal to the phantom's labels.nii.gz voxel for voxel in patient space, and read back through highdicom with
the right codes, colours, algorithm and references. The SR must pass dciodvfy and give back the measurements
through highdicom. UIDs must be the same for the same inputs and differ for another model version.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from openmsk.labels import BY_NAME, CARTILAGES, LATERALITY, TISSUES
from openmsk.phantom import LABELS, Phantom, generate, write_series
from tests.dicom_objects import differing
from worker import analysis_process
from worker.analysis import analyse
from worker.dicom.seg import SegResult, seg_uids, write_seg
from worker.dicom.sr import CODE_THICKNESS, CODE_VOLUME, THICKNESS_STATISTICS, write_sr
from worker.preview import write_preview
from worker.volume import SeriesVolume, load_series, read_series

MODEL, VERSION = "knee-test-model", "1.2.0"
LABEL_OF_DISPLAY = {t.display_name: t.label for t in TISSUES.values()}
NAME_OF_DISPLAY = {t.display_name: t.name for t in TISSUES.values()}


def _tool(name: str) -> str | None:
    """A command from the venv (dcmqi installs its binaries there) or from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The phantom written as DICOM, loaded back, and its SEG, measurements and SR (written once)."""
    out = tmp_path_factory.mktemp("segsr")
    ph = generate(seed=7, size="small", orientation="oblique", laterality="L")
    files = write_series(ph, out / "phantom")
    volume = load_series(read_series(files["dicom_dir"]))
    seg = write_seg(volume, ph.labels, MODEL, VERSION, out / "seg.dcm")
    measurements = analyse(ph.labels, ph.spacing)
    sr = write_sr(seg.path, volume, measurements, MODEL, VERSION, out / "sr.dcm")
    return {"ph": ph, "files": files, "volume": volume, "seg": seg, "sr": sr, "m": measurements, "out": out}


def _dciodvfy_errors(path: Path) -> list[str]:
    tool = _tool("dciodvfy")
    assert tool is not None, "dciodvfy (Debian package dicom3tools) is missing: `make test` installs it"
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


# --- the tissue table ---------------------------------------------------------------------------------------


def test_tissue_table_matches_the_canonical_labels() -> None:
    assert {value: t.name for value, t in TISSUES.items()} == LABELS
    assert [t.name for t in CARTILAGES] == [
        "femoral_cartilage",
        "medial_tibial_cartilage",
        "lateral_tibial_cartilage",
        "patellar_cartilage",
    ]
    assert {t.name: TISSUES[t.bone].name for t in CARTILAGES if t.bone} == {
        "femoral_cartilage": "femur",
        "medial_tibial_cartilage": "tibia",
        "lateral_tibial_cartilage": "tibia",
        "patellar_cartilage": "patella",
    }
    assert BY_NAME["femur"].property_type.value == "71341001"
    assert BY_NAME["medial_meniscus"].property_type.value == "74135004"
    assert BY_NAME["patellar_cartilage"].anatomic_region.value == "64234005"  # type: ignore[union-attr]


def test_tissue_colours_are_distinct_and_not_grey() -> None:
    lab = {t.name: hd.color.CIELabColor.from_rgb(*t.rgb) for t in TISSUES.values()}
    points = {name: (c.l_star, c.a_star, c.b_star) for name, c in lab.items()}
    for a, b in itertools.combinations(points, 2):
        assert math.dist(points[a], points[b]) >= 30, (a, b)  # ΔE*ab
    for name, (_, a_star, b_star) in points.items():
        assert math.hypot(a_star, b_star) >= 30, name  # chroma: a grey MR image must not swallow it


# --- SEG ----------------------------------------------------------------------------------------------------


def test_seg_passes_dciodvfy(case: dict[str, Any]) -> None:
    assert _dciodvfy_errors(case["seg"].path) == []


def test_seg_reads_back_through_dcmqi_equal_to_the_labels(case: dict[str, Any], tmp_path: Path) -> None:
    """dcmqi writes one image per segment on its own grid; compare with labels.nii.gz in patient space."""
    tool = _tool("segimage2itkimage")
    assert tool is not None, "segimage2itkimage (PyPI package dcmqi) is missing: `make test` installs it"
    subprocess.run(
        [tool, "--inputDICOM", str(case["seg"].path), "--outputDirectory", str(tmp_path), "-t", "nifti"],
        check=True,
        capture_output=True,
    )
    meta = json.loads((tmp_path / "meta.json").read_text())
    label_of = {
        int(attrs["labelID"]): LABEL_OF_DISPLAY[attrs["SegmentLabel"]]
        for group in meta["segmentAttributes"]
        for attrs in group
    }
    for group in meta["segmentAttributes"]:
        for attrs in group:
            tissue = TISSUES[label_of[int(attrs["labelID"])]]
            assert attrs["recommendedDisplayRGBValue"] == list(tissue.rgb)
            assert attrs["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == tissue.property_type.value

    reference = nib.load(str(case["files"]["labels"]))
    ref_labels = np.asarray(reference.dataobj)
    to_ref = np.linalg.inv(reference.affine)
    rebuilt = np.zeros_like(ref_labels)
    for path in sorted(tmp_path.glob("*.nii.gz")):
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
        # Both affines are RAS (NIfTI); map dcmqi's voxels into the reference grid and check they land on it.
        index = to_ref @ image.affine
        np.testing.assert_allclose(index, np.round(index), atol=1e-3)
        ijk = np.argwhere(data > 0)
        target = np.rint(ijk @ index[:3, :3].T + index[:3, 3]).astype(int)
        values = data[tuple(ijk.T)]
        rebuilt[tuple(target.T)] = [label_of[int(v)] for v in values]
    np.testing.assert_array_equal(rebuilt, ref_labels)


def test_seg_reads_back_through_highdicom(case: dict[str, Any]) -> None:
    seg = hd.seg.segread(case["seg"].path)
    volume: SeriesVolume = case["volume"]
    ph: Phantom = case["ph"]
    result: SegResult = case["seg"]
    assert seg.SeriesInstanceUID == result.series_uid
    assert seg.SOPInstanceUID == result.sop_uid
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesDescription == f"OpenMSK knee segmentation ({MODEL} {VERSION})"
    assert str(seg.ContentCreatorName) == "OpenMSK Node^"
    assert seg.StudyInstanceUID == volume.sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == volume.sources[0].FrameOfReferenceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == volume.sources[0].SeriesInstanceUID
    assert len(referenced.ReferencedInstanceSequence) == len(volume.sources)

    assert result.segments == [LABELS[v] for v in sorted(np.unique(ph.labels)) if v]
    for number, name in enumerate(result.segments, start=1):
        tissue = BY_NAME[name]
        desc = seg.get_segment_description(number)
        assert desc.segment_label == tissue.display_name
        assert desc.segmented_property_type.value == tissue.property_type.value
        assert desc.segmented_property_category.value == tissue.category.value
        assert desc.algorithm_identification[0].AlgorithmName == MODEL
        assert desc.algorithm_identification[0].AlgorithmVersion == VERSION
        assert desc.algorithm_type.value == "AUTOMATIC"
        rgb = hd.color.CIELabColor.from_dicom_value(desc.RecommendedDisplayCIELabValue).to_rgb()
        assert tuple(rgb) == tissue.rgb
        modifiers = desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
        assert modifiers[0].CodeValue == LATERALITY["L"].value
        if tissue.region_modifier is not None:
            region = desc.AnatomicRegionSequence[0]
            assert region.AnatomicRegionModifierSequence[0].CodeValue == tissue.region_modifier.value

    # Pixels: the label map rebuilt from the segments, source slice by source slice (frames were omitted
    # where a segment is absent, so rebuild through the source references, not frame order).
    uids = [ds.SOPInstanceUID for ds in volume.sources]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    lut = np.array([0] + [BY_NAME[n].label for n in result.segments])
    np.testing.assert_array_equal(lut[pixels].transpose(2, 1, 0), ph.labels)
    assert seg.NumberOfFrames < len(uids) * len(result.segments)  # empty frames left out


def test_labelmap_seg_reads_back_equal(case: dict[str, Any]) -> None:
    """Label Map SEG (dicom3tools of 2022 predates the SOP class, so only the readback is checked)."""
    ph: Phantom = case["ph"]
    result = write_seg(case["volume"], ph.labels, MODEL, VERSION, case["out"] / "seg_lm.dcm", labelmap=True)
    seg = hd.seg.segread(result.path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert seg.SegmentationType == "LABELMAP"
    uids = [ds.SOPInstanceUID for ds in case["volume"].sources]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    lut = np.array([0] + [BY_NAME[n].label for n in result.segments])
    np.testing.assert_array_equal(lut[pixels].transpose(2, 1, 0), ph.labels)
    assert {result.series_uid, result.sop_uid}.isdisjoint({case["seg"].series_uid, case["seg"].sop_uid})


def test_seg_uids_are_derived_from_series_model_and_version(case: dict[str, Any], tmp_path: Path) -> None:
    ph: Phantom = case["ph"]
    again = write_seg(case["volume"], ph.labels, MODEL, VERSION, tmp_path / "again.dcm")
    assert (again.series_uid, again.sop_uid) == (case["seg"].series_uid, case["seg"].sop_uid)
    first, second = pydicom.dcmread(case["seg"].path), pydicom.dcmread(again.path)
    assert second.SOPInstanceUID == case["seg"].sop_uid
    assert differing(first, second) == []  # a rerun writes the same object (no random UID inside either)
    series = str(case["volume"].sources[0].SeriesInstanceUID)
    other = seg_uids(series, MODEL, "1.2.1")
    assert set(other).isdisjoint({case["seg"].series_uid, case["seg"].sop_uid})
    assert set(seg_uids(series, "other-model", VERSION)).isdisjoint(other)
    assert all(len(uid) <= 64 and uid.startswith("2.25.") for uid in other)


def test_absent_tissues_get_no_segment(case: dict[str, Any], tmp_path: Path) -> None:
    labels = case["ph"].labels.copy()
    labels[labels == 9] = 0  # no lateral meniscus
    labels[labels == 3] = 0  # no patella
    result = write_seg(case["volume"], labels, MODEL, VERSION, tmp_path / "partial.dcm")
    assert "lateral_meniscus" not in result.segments and "patella" not in result.segments
    numbers = [int(item.SegmentNumber) for item in pydicom.dcmread(result.path).SegmentSequence]
    assert numbers == list(range(1, len(result.segments) + 1))
    assert _dciodvfy_errors(result.path) == []


def test_seg_refuses_labels_off_the_grid(case: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        write_seg(case["volume"], case["ph"].labels[:, :, :-1], MODEL, VERSION, tmp_path / "x.dcm")
    with pytest.raises(ValueError, match="no tissue"):
        write_seg(case["volume"], np.zeros_like(case["ph"].labels), MODEL, VERSION, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


# --- SR -----------------------------------------------------------------------------------------------------


def test_sr_passes_dciodvfy(case: dict[str, Any]) -> None:
    assert _dciodvfy_errors(case["sr"].path) == []


def test_sr_reads_back_the_measurements(case: dict[str, Any]) -> None:
    sr = hd.sr.srread(case["sr"].path)
    seg = pydicom.dcmread(case["seg"].path, stop_before_pixels=True)
    assert sr.SOPInstanceUID == case["sr"].sop_uid
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    tissues = case["m"]["tissues"]
    assert len(groups) == len(tissues)
    numbers = {name: n for n, name in enumerate(case["seg"].segments, start=1)}
    for group in groups:
        name = NAME_OF_DISPLAY[str(group.tracking_identifier)]
        referenced = group.referenced_segment
        assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert referenced.referenced_segment_numbers == [numbers[name]]
        assert group.finding_type.value == BY_NAME[name].property_type.value
        volume = group.get_measurements(name=CODE_VOLUME.to_code())
        assert len(volume) == 1 and volume[0].unit.value == "mm3"
        assert volume[0].value == pytest.approx(tissues[name]["volume_mm3"], rel=1e-6)
        thickness = group.get_measurements(name=CODE_THICKNESS.to_code())
        if BY_NAME[name].is_cartilage:
            by_derivation = {m.derivation.value: m.value for m in thickness}
            for key, code in THICKNESS_STATISTICS.items():
                assert by_derivation[code.value] == pytest.approx(
                    tissues[name]["thickness_mm"][key], abs=1e-4
                )
        else:
            assert thickness == []


def test_sr_uids_are_repeatable(case: dict[str, Any], tmp_path: Path) -> None:
    again = write_sr(case["seg"].path, case["volume"], case["m"], MODEL, VERSION, tmp_path / "sr.dcm")
    assert (again.series_uid, again.sop_uid) == (case["sr"].series_uid, case["sr"].sop_uid)
    other = write_sr(case["seg"].path, case["volume"], case["m"], MODEL, "9", tmp_path / "sr9.dcm")
    assert {other.series_uid, other.sop_uid}.isdisjoint({again.series_uid, again.sop_uid})


def test_sr_refuses_measurements_without_a_segment(case: dict[str, Any], tmp_path: Path) -> None:
    labels = case["ph"].labels.copy()
    labels[labels == 9] = 0
    partial = write_seg(case["volume"], labels, MODEL, VERSION, tmp_path / "partial.dcm")
    with pytest.raises(ValueError, match="lateral_meniscus"):
        write_sr(partial.path, case["volume"], case["m"], MODEL, VERSION, tmp_path / "sr.dcm")


# --- preview ------------------------------------------------------------------------------------------------


def test_preview_shows_every_tissue_in_its_colour(case: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    ph: Phantom = case["ph"]
    path = write_preview(case["volume"].image, ph.labels, ph.affine_lps, tmp_path / "preview.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        pixels = np.asarray(img).reshape(-1, 3).astype(np.int64)
    packed = np.unique((pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2])
    colours = {(int(p >> 16), int(p >> 8) & 255, int(p) & 255) for p in packed}
    for value in np.unique(ph.labels):
        if value:
            assert TISSUES[int(value)].rgb in colours, LABELS[int(value)]  # its legend swatch
    # Spacing instead of an affine: still a montage, planes in voxel order.
    assert write_preview(ph.image, ph.labels, ph.spacing, tmp_path / "plain.png").stat().st_size > 0


def test_worker_warm_up_runs_every_output_writer() -> None:
    """A worker warms the write/analyse stages at start; a fault there must show up here, not as a slow job."""
    from worker.warmup import warm_up_outputs

    assert warm_up_outputs() > 0


def test_analysis_runs_in_a_helper_process_and_survives_its_loss() -> None:
    """The analysis runs beside the writing in a process of its own; if that process dies, the job's
    analysis still completes (in the calling thread) and the next one gets a new process."""
    phantom = generate(seed=41, size="small")
    expected = analyse(phantom.labels, phantom.spacing)
    assert analysis_process.start_analysis(phantom.labels, phantom.spacing).result() == expected
    first = analysis_process.helper_pid()
    assert first is not None and first != os.getpid()

    os.kill(first, signal.SIGKILL)
    assert analysis_process.start_analysis(phantom.labels, phantom.spacing).result() == expected
    assert analysis_process.start_analysis(phantom.labels, phantom.spacing).result() == expected
    second = analysis_process.helper_pid()
    assert second is not None and second != first
    analysis_process.shutdown()
    assert analysis_process.helper_pid() is None
