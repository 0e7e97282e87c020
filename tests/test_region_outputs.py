"""The region outputs: region SEG, SR groups per subregion, thickness maps (PNG and Secondary Capture) and the
change since the prior visit, on small phantoms.

The region label map and its measurements come from the phantom's own truth (its subregion map) and the
node's thickness measurement per region, so these tests check the writers and the prior lookup, not the
subregion assignment (tests of worker/subregions.py do that). The prior SR is looked up in a real Orthanc, the
node's own priors in a real Redis.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests

from openmsk.labels import LATERALITY
from openmsk.phantom import Phantom, generate, write_series
from openmsk.regions import MEASURED, NOT_MEASURABLE, REGIONS, REGIONS_BY_NAME
from tests.dicom_objects import differing
from worker import analysis_process
from worker.analysis import analyse, cartilage_thickness
from worker.dicom.sc import sc_uids, write_thickness_sc
from worker.dicom.seg import REGION_KINDS, seg_header, seg_uids, write_seg
from worker.dicom.sr import (
    CODE_AREA,
    CODE_T2,
    CODE_THICKNESS,
    STATISTICS,
    change_identifier,
    measurement_document,
    write_sr,
)
from worker.prior import NodePriors, OrthancPriors, Prior, compare, find_prior, mean_thicknesses, patient_key
from worker.thickness_maps import MAPS, AnatomicalFrame, thickness_maps, write_thickness_maps
from worker.volume import SeriesVolume, load_series, read_series

MODEL, VERSION = "knee-test-model", "1.2.0"
THINNED = "femoral_medial_central"
THINNING_MM = 0.3


def _dciodvfy_errors(path: Path) -> list[str]:
    beside = Path(sys.executable).parent / "dciodvfy"
    tool = str(beside) if beside.exists() else shutil.which("dciodvfy")
    assert tool is not None, "dciodvfy (Debian package dicom3tools) is missing: `make test` installs it"
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def region_measurements(ph: Phantom) -> dict[str, Any]:
    """analyse() of the phantom plus a ``regions`` entry per subregion of the shape openmsk/regions.py gives:
    each region measured as its cartilage alone (the other regions of that cartilage removed)."""
    assert ph.regions is not None
    measurements = analyse(ph.labels, ph.spacing)
    voxel = float(np.prod(ph.spacing))
    regions: dict[str, Any] = {}
    for label, region in REGIONS.items():
        mask = ph.regions == label
        parent = region.parent
        entry: dict[str, Any] = {
            "label": label,
            "display_name": region.display_name,
            "tissue": parent.name,
        }
        only = ph.labels.copy()
        only[(ph.labels == parent.label) & ~mask] = 0
        stats = cartilage_thickness(only, ph.spacing, parent.label, parent.bone) if mask.any() else None
        if stats is None:
            entry |= {
                "volume_mm3": None,
                "thickness_mm": None,
                "interface_area_mm2": None,
                "status": NOT_MEASURABLE,
                "reason": "absent from the label map",
            }
        else:
            entry |= {
                "volume_mm3": float(mask.sum()) * voxel,
                "thickness_mm": {k: stats[k] for k in ("mean", "median", "std", "p95")},
                "interface_area_mm2": stats["interface_area_mm2"],
                "status": MEASURED,
                "reason": None,
            }
        regions[region.name] = entry
    measurements["regions"] = regions
    return measurements


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A left oblique phantom (written as DICOM, loaded back) with one region cut away (not measurable) and
    T2 statistics in one region: its tissue and region SEGs, the SR and the maps."""
    out = tmp_path_factory.mktemp("regions")
    ph = generate(seed=5, size="small", orientation="oblique", laterality="L")
    assert ph.regions is not None
    files = write_series(ph, out / "phantom")
    volume = load_series(read_series(files["dicom_dir"]))
    regions = ph.regions.copy()
    regions[regions == REGIONS_BY_NAME["patellar_lateral"].label] = 0  # not measurable: gets no segment
    ph_cut = Phantom(ph.image, ph.labels, ph.affine_lps, ph.spacing, ph.truth, ph.meta, regions)
    m = region_measurements(ph_cut)
    m["regions"]["lateral_tibial_central"]["t2_ms"] = {"mean": 35.25, "median": 34.5, "std": 4.0, "p95": 42.0}
    seg = write_seg(volume, ph.labels, MODEL, VERSION, out / "seg.dcm")
    rseg = write_seg(volume, regions, MODEL, VERSION, out / "seg_regions.dcm", regions=True)
    sr = write_sr(seg.dataset, volume, m, MODEL, VERSION, out / "sr.dcm", region_seg=rseg.dataset)
    return {
        "ph": ph,
        "regions": regions,
        "volume": volume,
        "seg": seg,
        "rseg": rseg,
        "sr": sr,
        "m": m,
        "out": out,
    }


# --- region SEG ---------------------------------------------------------------------------------------------


def test_region_seg_passes_dciodvfy_and_reads_back(case: dict[str, Any]) -> None:
    rseg = case["rseg"]
    assert _dciodvfy_errors(rseg.path) == []
    ds = hd.seg.segread(rseg.path)
    volume: SeriesVolume = case["volume"]
    assert ds.ContentLabel == "KNEE_REGIONS"
    assert ds.StudyInstanceUID == volume.sources[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == volume.sources[0].FrameOfReferenceUID
    assert int(ds.SeriesNumber) == 1100 + int(volume.sources[0].SeriesNumber)
    present = [int(v) for v in np.unique(case["regions"]) if v]
    assert rseg.segments == [REGIONS[v].name for v in present]
    assert "patellar_lateral" not in rseg.segments
    for number, name in enumerate(rseg.segments, start=1):
        region = REGIONS_BY_NAME[name]
        desc = ds.get_segment_description(number)
        assert desc.segment_label == region.display_name
        assert desc.segmented_property_type.value == region.parent.property_type.value
        anatomic = desc.AnatomicRegionSequence[0]
        assert anatomic.CodeValue == region.parent.anatomic_region.value  # type: ignore[union-attr]
        modifiers = [m.CodeValue for m in anatomic.AnatomicRegionModifierSequence]
        assert all(m.value in modifiers for m in region.modifiers), name
        assert tuple(hd.color.CIELabColor.from_dicom_value(desc.RecommendedDisplayCIELabValue).to_rgb()) == (
            region.rgb
        )
        laterality = desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
        assert laterality[0].CodeValue == LATERALITY["L"].value
    uids = [s.SOPInstanceUID for s in volume.sources]
    pixels = ds.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    lut = np.array([0] + [REGIONS_BY_NAME[n].label for n in rseg.segments])
    np.testing.assert_array_equal(lut[pixels].transpose(2, 1, 0), case["regions"])


def test_region_seg_uids_are_stable_and_distinct_from_the_tissue_seg(
    case: dict[str, Any], tmp_path: Path
) -> None:
    again = write_seg(case["volume"], case["regions"], MODEL, VERSION, tmp_path / "r.dcm", regions=True)
    assert (again.series_uid, again.sop_uid) == (case["rseg"].series_uid, case["rseg"].sop_uid)
    assert {again.series_uid, again.sop_uid}.isdisjoint({case["seg"].series_uid, case["seg"].sop_uid})
    series = str(case["volume"].sources[0].SeriesInstanceUID)
    assert set(seg_uids(series, MODEL, "1.2.1", regions=True)).isdisjoint({again.series_uid, again.sop_uid})
    # The tissue table does not know region labels: the region map alone is not a tissue SEG.
    with pytest.raises(ValueError, match="no tissue"):
        write_seg(case["volume"], case["regions"], MODEL, VERSION, tmp_path / "x.dcm")
    assert set(REGION_KINDS) == set(REGIONS)


def test_the_sr_references_the_region_seg_by_its_header_as_it_would_the_seg(
    case: dict[str, Any], tmp_path: Path
) -> None:
    """A job builds the SR from ``seg_header`` while the helper process still writes the region SEG: the
    header must be the written SEG's identity, and the SR the same as one built from the SEG itself."""
    volume = case["volume"]
    for labelmap in (False, True):
        header = seg_header(volume, case["regions"], MODEL, VERSION, regions=True, labelmap=labelmap)
        written = write_seg(
            volume,
            case["regions"],
            MODEL,
            VERSION,
            tmp_path / f"r{labelmap}.dcm",
            regions=True,
            labelmap=labelmap,
        ).dataset
        assert written is not None
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            assert header[keyword].value == written[keyword].value, (keyword, labelmap)
        assert [(int(i.SegmentNumber), str(i.SegmentLabel)) for i in header.SegmentSequence] == [
            (int(i.SegmentNumber), str(i.SegmentLabel))
            for i in written.SegmentSequence
            if int(i.SegmentNumber)
        ]  # a Label Map SEG's background segment 0 is not one to reference
        assert [i.SeriesInstanceUID for i in header.ReferencedSeriesSequence] == [
            i.SeriesInstanceUID for i in written.ReferencedSeriesSequence
        ]
    header = seg_header(volume, case["regions"], MODEL, VERSION, regions=True)
    from_header = write_sr(
        case["seg"].dataset, volume, case["m"], MODEL, VERSION, tmp_path / "sr.dcm", region_seg=header
    )
    assert from_header.regions == case["sr"].regions
    assert differing(pydicom.dcmread(from_header.path), pydicom.dcmread(case["sr"].path)) == []


def test_the_sr_is_the_document_highdicom_would_make_of_the_same_report(
    case: dict[str, Any], tmp_path: Path
) -> None:
    """write_sr attaches the content tree after highdicom made the document around its root (highdicom's own
    copy and re-reading of the tree cost a third of the SR's time): the file must be the one
    ``highdicom.sr.Comprehensive3DSR`` writes for the same report and evidence, item for item."""
    import highdicom as hd

    written = pydicom.dcmread(case["sr"].path)

    def items(sequence: Any) -> int:
        return sum(1 + items(item.get("ContentSequence", [])) for item in sequence)

    assert items(written.ContentSequence) > 500  # the groups of the tissues, regions and their statistics
    attributes = {
        "series_instance_uid": written.SeriesInstanceUID,
        "series_number": int(written.SeriesNumber),
        "sop_instance_uid": written.SOPInstanceUID,
        "instance_number": 1,
        "manufacturer": written.Manufacturer,
        "is_complete": True,
        "is_final": False,
        "is_verified": False,
        "series_description": written.SeriesDescription,
        "manufacturer_model_name": written.ManufacturerModelName,
        "software_versions": written.SoftwareVersions,
    }
    evidence = [case["seg"].dataset, case["rseg"].dataset]
    report = pydicom.Dataset()
    for element in written:
        if element.keyword in {
            "ConceptNameCodeSequence",
            "ContentTemplateSequence",
            "ContinuityOfContent",
            "ValueType",
            "ContentSequence",
        }:
            report.add(element)
    by_highdicom = tmp_path / "highdicom.dcm"
    hd.sr.Comprehensive3DSR(evidence=evidence, content=report, **attributes).save_as(by_highdicom)
    again = tmp_path / "shortcut.dcm"
    measurement_document([report], evidence, **attributes).save_as(again)
    for path in (case["sr"].path, again):
        assert differing(pydicom.dcmread(path), pydicom.dcmread(by_highdicom)) == [], path
    # a report that references an instance not given as evidence is refused, as highdicom refuses it
    with pytest.raises(ValueError, match="evidence"):
        measurement_document([report], evidence[:1], **attributes)


def test_the_region_seg_written_in_the_helper_process_is_the_one_written_here(
    case: dict[str, Any], tmp_path: Path
) -> None:
    """Written from the series' headers alone (no pixels sent), in the helper process."""
    written = analysis_process.start_region_seg(
        case["volume"], case["regions"], MODEL, VERSION, tmp_path / "beside.dcm"
    ).result()
    helper = analysis_process.helper_pid()
    assert helper is not None and helper != os.getpid()
    assert (written.sop_uid, written.segments, written.dataset) == (
        case["rseg"].sop_uid,
        case["rseg"].segments,
        None,
    )
    beside, here = pydicom.dcmread(written.path), pydicom.dcmread(case["rseg"].path)
    assert differing(beside, here) == []
    assert beside.PixelData == here.PixelData


# --- SR -----------------------------------------------------------------------------------------------------


def _groups_by_identifier(path: Path) -> dict[str, Any]:
    sr = hd.sr.srread(path)
    return {str(g.tracking_identifier): g for g in sr.content.get_volumetric_roi_measurement_groups()}


def test_sr_has_a_group_per_measured_region(case: dict[str, Any]) -> None:
    assert _dciodvfy_errors(case["sr"].path) == []
    groups = _groups_by_identifier(case["sr"].path)
    regions = case["m"]["regions"]
    measured = [n for n, e in regions.items() if e["status"] == MEASURED]
    assert list(case["sr"].regions) == sorted(measured, key=lambda n: REGIONS_BY_NAME[n].label)
    numbers = {name: n for n, name in enumerate(case["rseg"].segments, start=1)}
    for name in measured:
        region = REGIONS_BY_NAME[name]
        group = groups[region.display_name]
        assert group.referenced_segment.referenced_sop_instance_uid == case["rseg"].sop_uid
        assert group.referenced_segment.referenced_segment_numbers == [numbers[name]]
        site = group.finding_sites[0]
        assert site.value.value == region.parent.anatomic_region.value  # type: ignore[union-attr]
        assert site.laterality.value == LATERALITY["L"].value
        modifier_codes = {
            item.ConceptCodeSequence[0].CodeValue
            for item in site.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "106233006"
        }
        assert {m.value for m in region.modifiers} <= modifier_codes
        thickness = {
            m.derivation.value: m.value for m in group.get_measurements(name=CODE_THICKNESS.to_code())
        }
        for key, code in STATISTICS.items():
            assert thickness[code.value] == pytest.approx(regions[name]["thickness_mm"][key], abs=1e-4)
        area = group.get_measurements(name=CODE_AREA.to_code())
        assert area[0].unit.value == "mm2"
        assert area[0].value == pytest.approx(regions[name]["interface_area_mm2"], abs=1e-3)
    # Not measurable: no group, no zero anywhere.
    assert REGIONS_BY_NAME["patellar_lateral"].display_name not in groups
    t2 = {
        m.derivation.value: (m.value, m.unit.value)
        for m in groups[REGIONS_BY_NAME["lateral_tibial_central"].display_name].get_measurements(
            name=CODE_T2.to_code()
        )
    }
    assert t2[STATISTICS["mean"].value] == (pytest.approx(35.25), "ms")
    assert all(
        not g.get_measurements(name=CODE_T2.to_code())
        for k, g in groups.items()
        if "lateral tibial cartilage, central" not in k.lower()
    )


def test_sr_refuses_a_measured_region_without_a_segment(case: dict[str, Any], tmp_path: Path) -> None:
    m = {**case["m"], "regions": dict(case["m"]["regions"])}
    m["regions"]["patellar_lateral"] = {**m["regions"]["patellar_medial"], "label": 32}
    with pytest.raises(ValueError, match="patellar_lateral"):
        write_sr(
            case["seg"].dataset,
            case["volume"],
            m,
            MODEL,
            VERSION,
            tmp_path / "sr.dcm",
            region_seg=case["rseg"].dataset,
        )


# --- thickness maps -----------------------------------------------------------------------------------------


def test_maps_are_written_and_follow_the_anatomy_not_the_grid(case: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    ph: Phantom = case["ph"]
    maps = write_thickness_maps(ph.labels, ph.affine_lps, tmp_path, laterality="L")
    assert [m.spec.name for m in maps] == [s.name for s in MAPS]
    for m in maps:
        assert m.path == tmp_path / f"thickness_{m.spec.name}.png"
        with Image.open(m.path) as img:
            assert img.mode == "RGB" and img.size[0] > m.thickness_mm.shape[1]
        assert np.isfinite(m.thickness_mm).sum() > 50
    truth = ph.truth["cartilage_thickness_mm"]
    tibial = maps[1]
    expected = (truth["medial_tibial_cartilage"] + truth["lateral_tibial_cartilage"]) / 2
    # Volume per area seen from above: the plateaus' mean thickness (partly covered edge cells read thinner).
    assert np.nanmedian(tibial.thickness_mm) == pytest.approx(expected, rel=0.15)
    # The same knee in the sagittal plane gives the same tibial map (patient frame, not image axes).
    sagittal = generate(seed=5, size="small", orientation="sagittal", laterality="L")
    again = thickness_maps(sagittal.labels, sagittal.affine_lps)[1]
    assert np.nanmedian(again.thickness_mm) == pytest.approx(np.nanmedian(tibial.thickness_mm), rel=0.1)
    # An explicit frame rotated 90 degrees about SI swaps ML and AP: the tibial map turns.
    rotation = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    centre = ph.affine_lps[:3, :3] @ (np.array(ph.labels.shape) / 2) + ph.affine_lps[:3, 3]
    turned = thickness_maps(ph.labels, ph.affine_lps, frame=AnatomicalFrame(rotation, centre))[1]
    assert turned.thickness_mm.shape[::-1] == pytest.approx(tibial.thickness_mm.shape, abs=2)
    with pytest.raises(ValueError, match="rotation"):
        AnatomicalFrame(np.diag([1.0, 1.0, -1.0]), centre)
    # From the analysis' own per-face thickness the maps show the numbers the report summarises.
    from openmsk.labels import CARTILAGES
    from worker.analysis import face_thickness

    faces = {t.label: face_thickness(ph.labels, ph.spacing, t.label, t.bone) for t in CARTILAGES}
    by_face = {m.spec.name: m for m in thickness_maps(ph.labels, ph.affine_lps, faces=faces)}
    tissues = case["m"]["tissues"]
    assert np.nanmedian(by_face["femoral"].thickness_mm) == pytest.approx(
        tissues["femoral_cartilage"]["thickness_mm"]["median"], rel=0.03
    )
    assert np.nanmedian(by_face["patellar"].thickness_mm) == pytest.approx(
        tissues["patellar_cartilage"]["thickness_mm"]["median"], rel=0.03
    )
    # The analysis' knee axes (grid mm space: medial, anterior, superior) become the same frame: the
    # phantom's knee is straight in the patient's axes, whatever the grid's orientation and the side.
    from_analysis = AnatomicalFrame.from_grid_axes(case["m"]["region_frame"]["axes"], ph.affine_lps)
    assert from_analysis is not None
    np.testing.assert_allclose(from_analysis.rotation, np.eye(3), atol=0.05)
    assert AnatomicalFrame.from_grid_axes({"medial": [1, 0, 0]}, ph.affine_lps) is None


def test_thickness_secondary_captures_pass_dciodvfy_and_keep_their_uids(
    case: dict[str, Any], tmp_path: Path
) -> None:
    ph: Phantom = case["ph"]
    volume: SeriesVolume = case["volume"]
    maps = thickness_maps(ph.labels, ph.affine_lps, laterality="L")
    written = write_thickness_sc(volume, maps, MODEL, VERSION, tmp_path)
    again = write_thickness_sc(volume, maps, MODEL, VERSION, tmp_path / "again")
    assert [(r.series_uid, r.sop_uid) for r in written] == [(r.series_uid, r.sop_uid) for r in again]
    assert len({r.sop_uid for r in written}) == len(maps) and len({r.series_uid for r in written}) == 1
    series = str(volume.sources[0].SeriesInstanceUID)
    assert sc_uids(series, MODEL, "9", "femoral")[1] not in {r.sop_uid for r in written}
    for result, m in zip(written, maps, strict=True):
        assert _dciodvfy_errors(result.path) == []
        ds = pydicom.dcmread(result.path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.StudyInstanceUID == volume.sources[0].StudyInstanceUID
        assert ds.PatientID == volume.sources[0].PatientID
        assert ds.PhotometricInterpretation == "RGB" and ds.Laterality == "L"
        np.testing.assert_array_equal(ds.pixel_array, m.rgb)


# --- change since the prior visit ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def visits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Baseline and a follow-up of the same left knee, 0.3 mm thinner in one region: on the same grid, and
    acquired coronally (another grid and orientation)."""
    out = tmp_path_factory.mktemp("visits")
    phantoms = {
        "base": generate(seed=9, size="small", orientation="sagittal", laterality="L"),
        "follow": generate(
            seed=9, size="small", orientation="sagittal", laterality="L", thinning={THINNED: THINNING_MM}
        ),
        "coronal": generate(
            seed=9, size="small", orientation="coronal", laterality="L", thinning={THINNED: THINNING_MM}
        ),
    }
    data = {}
    for name, ph in phantoms.items():
        files = write_series(ph, out / name)
        volume = load_series(read_series(files["dicom_dir"]))
        data[name] = {"ph": ph, "volume": volume, "m": region_measurements(ph), "dir": out / name}
    return data


def _study(volume: SeriesVolume) -> tuple[str, str, str]:
    s = volume.sources[0]
    return str(s.PatientID), str(s.StudyDate), str(s.StudyInstanceUID)


def test_follow_up_change_from_the_node_priors(visits: dict[str, Any], redis_client: Any) -> None:
    base, follow = visits["base"], visits["follow"]
    pid, base_date, base_uid = _study(base["volume"])
    fpid, follow_date, follow_uid = _study(follow["volume"])
    assert pid == fpid and base_date < follow_date and base_uid != follow_uid
    priors = NodePriors(redis_client)
    priors.record(
        pid, "L", Prior(base_date, base_uid, MODEL, VERSION, mean_thicknesses(base["m"]), job_id="job-1")
    )
    # The key holds no PatientID in the clear.
    assert all(pid.encode() not in key for key in redis_client.keys("openmsk:prior:*"))
    assert priors.latest_before(pid, "R", follow_date, follow_uid) is None  # the other knee
    assert priors.latest_before(pid, "L", base_date, base_uid) is None  # nothing earlier than the baseline
    prior = find_prior([priors], pid, "L", follow_date, follow_uid)
    assert prior is not None and prior.job_id == "job-1"

    change = compare(follow["m"], prior, MODEL, VERSION)
    assert change["comparable"] and change["prior"] == {
        "study_date": base_date,
        "job_id": "job-1",
        "model": f"{MODEL} {VERSION}",
    }
    regions = change["regions"]
    # Small phantoms: thickness resolved to about 0.1 mm; the full-size figures are in bench/.
    assert regions[THINNED]["thickness_mean_mm"] == pytest.approx(-THINNING_MM, abs=0.15)
    assert regions[THINNED]["percent"] == pytest.approx(
        100 * regions[THINNED]["thickness_mean_mm"] / regions[THINNED]["prior_mm"]
    )
    untouched = [n for n in REGIONS_BY_NAME if n != THINNED and n in regions]
    assert len(untouched) == len(REGIONS_BY_NAME) - 1
    assert max(abs(regions[n]["thickness_mean_mm"]) for n in untouched) < 0.05  # same grid: only the thinning

    # Another grid and orientation: still compared region by region (small phantoms: 1.6-2.4 mm voxels, so
    # the change is coarse there; the full-size figures are in bench/).
    coronal = compare(visits["coronal"]["m"], prior, MODEL, VERSION)
    assert coronal["comparable"] and set(coronal["regions"]) == set(regions)
    assert coronal["regions"][THINNED]["thickness_mean_mm"] < 0


def test_another_model_version_is_not_comparable(visits: dict[str, Any]) -> None:
    base, follow = visits["base"], visits["follow"]
    _, base_date, base_uid = _study(base["volume"])
    prior = Prior(base_date, base_uid, MODEL, "0.9", mean_thicknesses(base["m"]), job_id="job-0")
    change = compare(follow["m"], prior, MODEL, VERSION)
    assert change["comparable"] is False and "not comparable" in change["reason"] and change["regions"] == {}


def test_prior_sr_found_in_orthanc_and_the_change_reported(
    visits: dict[str, Any], orthanc_server: Any, tmp_path: Path
) -> None:
    base, follow = visits["base"], visits["follow"]
    for name in ("base", "follow"):
        visit = visits[name]
        ph, volume = visit["ph"], visit["volume"]
        visit["seg"] = write_seg(volume, ph.labels, MODEL, VERSION, tmp_path / f"{name}_seg.dcm")
        visit["rseg"] = write_seg(
            volume, ph.regions, MODEL, VERSION, tmp_path / f"{name}_rseg.dcm", regions=True
        )
    sr = write_sr(
        base["seg"].dataset,
        base["volume"],
        base["m"],
        MODEL,
        VERSION,
        tmp_path / "base_sr.dcm",
        region_seg=base["rseg"].dataset,
    )
    auth = (orthanc_server.user, orthanc_server.password)
    maps = write_thickness_sc(
        base["volume"], thickness_maps(base["ph"].labels, base["ph"].affine_lps), MODEL, VERSION, tmp_path
    )
    for path in [sr.path, base["rseg"].path, *(m.path for m in maps)]:
        upload = requests.post(
            f"{orthanc_server.url}/instances", data=path.read_bytes(), auth=auth, timeout=10
        )
        upload.raise_for_status()
        # Every result lands in the source study, so a PACS shows it beside the images.
        tags = requests.get(
            f"{orthanc_server.url}/instances/{upload.json()['ID']}/simplified-tags", auth=auth, timeout=10
        ).json()
        assert tags["StudyInstanceUID"] == str(base["volume"].sources[0].StudyInstanceUID)

    pid, follow_date, follow_uid = _study(follow["volume"])
    source = OrthancPriors(orthanc_server.url, orthanc_server.user, orthanc_server.password)
    prior = source.latest_before(pid, "L", follow_date, follow_uid)
    assert prior is not None and prior.sr_uid == sr.sop_uid
    assert (prior.model_name, prior.model_version) == (MODEL, VERSION)
    assert prior.study_date == str(base["volume"].sources[0].StudyDate)
    expected = mean_thicknesses(base["m"])
    assert prior.thickness_mean_mm.keys() == {k for k, v in expected.items() if v is not None}
    for name, value in prior.thickness_mean_mm.items():
        assert value == pytest.approx(expected[name], abs=1e-4)
    assert source.latest_before(pid, "R", follow_date, follow_uid) is None  # the SR is of the left knee
    assert source.latest_before("someone-else", "L", follow_date, follow_uid) is None
    # An Orthanc that is down loses only its prior.
    assert (
        find_prior([OrthancPriors("http://127.0.0.1:9", timeout_s=1)], pid, "L", follow_date, follow_uid)
        is None
    )

    # The follow-up's SR carries the change as groups of their own.
    follow["m"]["change"] = compare(follow["m"], prior, MODEL, VERSION)
    follow_sr = write_sr(
        follow["seg"].dataset,
        follow["volume"],
        follow["m"],
        MODEL,
        VERSION,
        tmp_path / "follow_sr.dcm",
        region_seg=follow["rseg"].dataset,
    )
    assert _dciodvfy_errors(follow_sr.path) == []
    groups = _groups_by_identifier(follow_sr.path)
    date = prior.study_date
    label = change_identifier(
        REGION_KINDS[REGIONS_BY_NAME[THINNED].label], f"{date[:4]}-{date[4:6]}-{date[6:]}"
    )
    by_unit = {m.unit.value: m.value for m in groups[label].get_measurements(name=CODE_THICKNESS.to_code())}
    change = follow["m"]["change"]["regions"][THINNED]
    assert by_unit["mm"] == pytest.approx(change["thickness_mean_mm"], abs=1e-4)
    assert by_unit["%"] == pytest.approx(change["percent"], abs=0.01)
    assert THINNED in follow_sr.changes


def test_patient_key_hashes_and_refuses_a_missing_match() -> None:
    assert patient_key("P1", "L") != patient_key("P1", "R") != patient_key("P2", "R")
    assert len(patient_key("P1", "L")) == 64 and "P1" not in patient_key("P1", "L")
    with pytest.raises(ValueError):
        patient_key("", "L")
    with pytest.raises(ValueError):
        patient_key("P1", "X")


def test_a_job_remembers_its_result_and_the_next_visit_gets_the_change(
    visits: dict[str, Any], redis_client: Any, tmp_path: Path
) -> None:
    """What the pipeline does (worker/region_outputs.py): the baseline job finds no prior and is remembered;
    the follow-up's measurements get ``change``, and its maps, region SEG and SCs are listed for delivery."""
    from worker.prior import PriorLookup
    from worker.region_outputs import add_change, write_region_outputs

    base, follow = visits["base"], visits["follow"]
    lookup = PriorLookup(node=NodePriors(redis_client), job_id="baseline-job")
    base_m = dict(base["m"])
    add_change(base_m, base["volume"], lookup, MODEL, VERSION)
    assert "change" not in base_m  # the first visit: nothing to compare with
    follow_m = dict(follow["m"])
    add_change(
        follow_m, follow["volume"], PriorLookup(node=NodePriors(redis_client), job_id="f"), MODEL, VERSION
    )
    assert follow_m["change"]["prior"]["job_id"] == "baseline-job"
    assert follow_m["change"]["regions"][THINNED]["thickness_mean_mm"] == pytest.approx(
        -THINNING_MM, abs=0.15
    )
    add_change(follow_m, follow["volume"], None, MODEL, VERSION)  # no priors configured: left as it is
    assert "change" in follow_m

    # report.json carries it, and the job page shows it from there.
    import json

    from flask import Flask, render_template

    import web.pages
    from worker.report import write_report

    json_path, _ = write_report(follow_m, {}, tmp_path / "report")
    report = json.loads(json_path.read_text())
    assert report["change"]["regions"][THINNED] == pytest.approx(follow_m["change"]["regions"][THINNED])
    app = Flask("test", template_folder=str(Path(web.pages.__file__).parent / "templates"))
    app.register_blueprint(web.pages.pages)  # its template filters
    with app.test_request_context():
        html = render_template("job_change.html", report=report)
        refused = render_template(
            "job_change.html",
            report={"change": compare(follow_m, Prior("20200101", "1.2", "other", "1"), MODEL, VERSION)},
        )
    assert html.count("<tr data-region=") == len(report["change"]["regions"])
    assert f"{report['change']['regions'][THINNED]['thickness_mean_mm']:.2f}" in html
    assert 'id="change-not-comparable"' in refused and "<tr data-region=" not in refused

    out = write_region_outputs(
        follow["volume"], follow["ph"].labels, follow["ph"].regions, follow_m, MODEL, VERSION, tmp_path
    )
    names = sorted(p.name for p in out.files)
    assert names == sorted(
        ["seg_regions.dcm"] + [f"thickness_{m.name}.{ext}" for m in MAPS for ext in ("png", "dcm")]
    )
    assert {Path(p).name for p, _, _ in out.dicom} == {n for n in names if n.endswith(".dcm")}
    assert out.region_seg is not None
    sr = write_sr(
        write_seg(follow["volume"], follow["ph"].labels, MODEL, VERSION, tmp_path / "seg.dcm").dataset,
        follow["volume"], follow_m, MODEL, VERSION, tmp_path / "sr.dcm", region_seg=out.region_seg,
    )  # fmt: skip
    assert THINNED in sr.changes and "femoral_cartilage" in sr.changes
    # Without DICOM (a NIfTI input): the PNG maps only.
    plain = write_region_outputs(
        follow["volume"], follow["ph"].labels, None, follow_m, MODEL, VERSION, tmp_path / "plain",
        dicom_outputs=False,
    )  # fmt: skip
    assert sorted(p.name for p in plain.files) == [
        f"thickness_{m.name}.png" for m in sorted(MAPS, key=lambda m: m.name)
    ]


def test_job_maps_draw_the_analysis_faces_and_a_stray_piece_does_not_unroll_them_edge_on() -> None:
    """The pipeline's analysis (in its own process) hands its per-face thickness back for the maps, and a
    model's stray femoral cartilage far behind the tibia (seen through the demo model on a full-size knee)
    does not pull the unrolling axis below the condyles: the sheet stays whole instead of wrapping at ±180°."""
    from worker.analysis_process import start_analysis

    ph = generate(seed=5, size="medium", orientation="sagittal", laterality="L")
    labels = ph.labels.copy()
    femoral = np.argwhere(labels == 4)
    # A 14 mm cube of "femoral cartilage" 45 mm below and 30 mm behind the sheet's centre, in background.
    centre_lps = ph.affine_lps[:3, :3] @ femoral.mean(axis=0) + ph.affine_lps[:3, 3]
    stray_lps = centre_lps + np.array([0.0, 30.0, -45.0])
    stray = np.linalg.solve(ph.affine_lps[:3, :3], stray_lps - ph.affine_lps[:3, 3]).round().astype(int)
    half = np.ceil(7.0 / np.asarray(ph.spacing)).astype(int)
    box = tuple(slice(c - h, c + h) for c, h in zip(stray, half, strict=True))
    assert np.all(stray - half >= 0) and np.all(stray + half <= labels.shape)
    labels[box][labels[box] == 0] = 4
    assert np.count_nonzero(labels == 4) > 1.1 * len(femoral)  # the piece is a real share of the sheet

    analysis = start_analysis(labels, ph.spacing)
    m = analysis.result()
    assert sorted(analysis.faces) == [4, 5, 6, 7]
    by_face = {x.spec.name: x for x in thickness_maps(labels, ph.affine_lps, faces=analysis.faces)}
    femoral_map = by_face["femoral"]
    assert np.nanmedian(femoral_map.thickness_mm) == pytest.approx(
        m["tissues"]["femoral_cartilage"]["thickness_mm"]["median"], rel=0.03
    )
    proxy = {x.spec.name: x for x in thickness_maps(labels, ph.affine_lps)}["femoral"]
    for drawn in (femoral_map, proxy):
        top, bottom = drawn.extent[2], drawn.extent[3]
        assert top < 170 and bottom > -170, drawn.extent  # distal (0°) inside, not cut at ±180°
    # The faces are the sheet's on the femur: the stray (a 14 mm thick blob to the proxy) is not drawn.
    assert (
        np.nanmax(femoral_map.thickness_mm) < 1.5 * m["tissues"]["femoral_cartilage"]["thickness_mm"]["p95"]
    )
