"""Cartilage subregions and their measurements against the phantom's own subregion truth.

Two implementations of one rule (the pymskt / Eckstein-Wirth femoral scheme with a 0.6 weight-bearing
fraction, tibial thirds, patellar facets) are compared: the phantom's, from its construction in knee-local
coordinates (openmsk/phantom/anatomy.py), and the node's, which finds the anatomical frame and the landmarks
in the label map alone (worker/subregions.py). Agreement therefore checks the frame (sagittal, coronal, axial
and oblique grids, left and right knees) and the landmarks.

Figures as measured (truth labels):

* assignment Dice: medium grids (0.8 × 0.8 × 1.4 mm, the test) 0.93 or more; full size, four planes × two
  knees (bench/analysis.py --regions) 0.964 or more; small grids 0.87-1.00 (a tibial third there is three or
  four 2.4 mm slices);
* thickness per subregion, full size, four planes × two knees: worst mean error 6.1 % (femoral anterior,
  the curved trochlea), median over the subregions 0.8-2.0 % per phantom;
* follow-up with 0.3 mm thinning of the medial weight-bearing femur (full-size oblique left knee): measured
  change -0.263 mm (error +0.037 mm), every other subregion within 0.011 mm.

The full-size cases cost about 25 s (two phantoms, two analyses); bench/analysis.py times the analysis.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from openmsk.phantom import Phantom, generate
from openmsk.regions import MEASURED, MEASUREMENT_KEYS, NOT_MEASURABLE, REGIONS, REGIONS_BY_NAME
from worker.analysis import analyse_with_regions
from worker.report import REPORT_SCHEMA, write_report
from worker.subregions import NoFrame, knee_frame

# Every plane, both knees. Medium grids (0.8 × 0.8 × 1.4 mm): on small ones (2.4 mm slices) a tibial third
# is three or four slices and one slice more or less (a sub-degree difference of frames) moves its Dice by
# 0.1, which says nothing about the frame.
CASES = [
    (0, "sagittal", "R"),
    (1, "coronal", "L"),
    (2, "axial", "R"),
    (3, "oblique", "L"),
    (5, "coronal", "R"),
    (6, "axial", "L"),
]
FULL_CASE = (3, "oblique", "L")
THINNED = "femoral_medial_central"
THINNING_MM = 0.3


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


@pytest.fixture(scope="module")
def medium() -> list[tuple[Phantom, dict[str, Any], np.ndarray | None]]:
    out = []
    for seed, orientation, laterality in CASES:
        ph = generate(seed=seed, size="medium", orientation=orientation, laterality=laterality)
        out.append((ph, *analyse_with_regions(ph.labels, ph.spacing)))
    return out


@pytest.fixture(scope="module")
def small() -> tuple[Phantom, dict[str, Any], np.ndarray | None]:
    ph = generate(seed=0, size="small", orientation="sagittal", laterality="R")
    return (ph, *analyse_with_regions(ph.labels, ph.spacing))


@pytest.fixture(scope="module")
def full() -> dict[str, tuple[Phantom, dict[str, Any]]]:
    """The full-size knee at baseline and at a follow-up with one region thinned."""
    seed, orientation, laterality = FULL_CASE
    out = {}
    for visit, thinning in (("baseline", None), ("follow_up", {THINNED: THINNING_MM})):
        ph = generate(seed, "full", orientation, laterality, thinning=thinning)
        out[visit] = (ph, analyse_with_regions(ph.labels, ph.spacing)[0])
    return out


def test_region_assignment_matches_the_phantom_in_every_plane_and_both_knees(
    medium: list[tuple[Phantom, dict[str, Any], np.ndarray | None]],
) -> None:
    for ph, _, region_map in medium:
        assert region_map is not None and ph.regions is not None
        assert region_map.shape == ph.labels.shape and region_map.dtype == np.uint8
        case = (ph.truth["orientation"], ph.truth["laterality"])
        # Every cartilage voxel has a region of its own tissue, and nothing else has one.
        for label, region in REGIONS.items():
            assert np.all(ph.labels[region_map == label] == region.tissue), (case, region.name)
        assert np.array_equal(region_map > 0, (ph.labels >= 4) & (ph.labels <= 7)), case
        for label, region in REGIONS.items():
            dice = _dice(region_map == label, ph.regions == label)
            assert dice >= 0.90, (case, region.name, round(dice, 3))


def test_frame_comes_from_the_anatomy_not_the_image_axes(
    medium: list[tuple[Phantom, dict[str, Any], np.ndarray | None]],
) -> None:
    """The frame's axes, turned into patient space, are the phantom's knee axes within a few degrees."""
    for ph, _, _ in medium:
        frame = knee_frame(ph.labels, ph.spacing)
        to_lps = ph.affine_lps[:3, :3] / np.asarray(ph.spacing)  # grid mm -> LPS directions
        medial = np.asarray(ph.truth["medial_direction_lps"])
        for axis, truth in ((0, medial), (1, np.array([0.0, -1.0, 0.0])), (2, np.array([0.0, 0.0, 1.0]))):
            angle = np.degrees(np.arccos(np.clip((to_lps @ frame.axes[axis]) @ truth, -1.0, 1.0)))
            assert angle < 4.0, (ph.truth["orientation"], ph.truth["laterality"], axis, angle)


def test_a_stray_piece_of_a_bone_label_does_not_tilt_the_frame(
    medium: list[tuple[Phantom, dict[str, Any], np.ndarray | None]],
) -> None:
    """A model's false positive apart from the bone (seen: muscle at the edge of a full-size oblique knee's
    field of view called tibia, 22 % of the tibia's size) tilted the superior axis by 70 degrees and sent the
    femoral subregions to Dice 0.1; the frame comes from each bone's largest piece."""
    ph = medium[0][0]
    labels = ph.labels.copy()
    tibia = int((labels == 2).sum())
    # a cube of background, a third of the tibia's size, in the grid's corner farthest from every bone
    from scipy import ndimage as ndi

    away = ndi.distance_transform_edt((labels < 1) | (labels > 3))
    corner = np.unravel_index(int(np.argmax(away)), labels.shape)
    side = round((tibia / 3) ** (1 / 3))
    block = tuple(
        slice(0, side) if c < n / 2 else slice(n - side, n) for c, n in zip(corner, labels.shape, strict=True)
    )
    assert away[block].min() > 2, "the cube must not touch a bone"
    labels[block] = 2
    clean, stray = knee_frame(ph.labels, ph.spacing), knee_frame(labels, ph.spacing)
    for axis in range(3):
        angle = np.degrees(np.arccos(np.clip(clean.axes[axis] @ stray.axes[axis], -1.0, 1.0)))
        assert angle < 0.5, (axis, angle)


def test_stray_cartilage_in_the_notch_does_not_move_the_landmarks(
    medium: list[tuple[Phantom, dict[str, Any], np.ndarray | None]],
) -> None:
    """A model's stray femoral-cartilage voxels in the intercondylar notch (seen on a full-size sagittal left
    knee: a sixth of a condyle's count per notch column) hid the gap between the condyles and put the
    trochlear notch behind the condyles, so all femoral cartilage became "anterior"."""
    ph, _, truth_map = medium[0]
    labels = ph.labels.copy()
    frame = knee_frame(labels, ph.spacing)
    femoral = np.argwhere(labels == 4)
    coords = frame.coordinates(femoral)
    behind = femoral[(coords[:, 1] < 0) & (np.abs(coords[:, 0]) > 12)]  # the condyles' cartilage
    # copies of one in twenty condylar cartilage voxels spread across the notch (|m| < 7 mm), kept behind: per
    # millimetre of m about a sixth of a condyle's count, as the model left them
    rng = np.random.default_rng(0)
    chosen = behind[rng.random(len(behind)) < 0.05]
    shift = rng.uniform(-7.0, 7.0, len(chosen)) - frame.coordinates(chosen)[:, 0]
    moved = chosen * frame.spacing + np.outer(shift, frame.axes[0])
    index = np.round(moved / frame.spacing).astype(int)
    inside = np.all((index >= 0) & (index < labels.shape), axis=1)
    index = index[inside]
    labels[tuple(index.T)] = np.where(labels[tuple(index.T)] == 0, 4, labels[tuple(index.T)])
    assert (labels == 4).sum() > (ph.labels == 4).sum() * 1.01, "too few strays to matter"
    _, region_map = analyse_with_regions(labels, ph.spacing)
    assert region_map is not None and truth_map is not None
    original = ph.labels == 4
    for name in ("femoral_anterior", "femoral_medial_central", "femoral_lateral_posterior"):
        label = REGIONS_BY_NAME[name].label
        dice = _dice((region_map == label) & original, truth_map == label)
        assert dice >= 0.85, (name, round(dice, 3))


def test_cartilage_pieces_off_the_femur_do_not_move_the_landmarks(
    medium: list[tuple[Phantom, dict[str, Any], np.ndarray | None]],
) -> None:
    """Pieces a model calls femoral cartilage away from the femur (seen: 12,000 voxels at the tibia's level
    behind the knee) pulled the condyles' posterior end 13 mm back and with it the weight-bearing boundary."""
    from worker.subregions import assign_regions

    ph = medium[0][0]
    _, clean = assign_regions(ph.labels, ph.spacing)
    labels = ph.labels.copy()
    frame = knee_frame(labels, ph.spacing)
    # the grid corner farthest behind the knee, a cube of background there called femoral cartilage
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (
        np.array(labels.shape) - 1
    )
    corner = corners[np.argmin(frame.coordinates(corners)[:, 1])]
    side = round((0.05 * (labels == 4).sum()) ** (1 / 3))
    block = tuple(
        slice(0, side) if c == 0 else slice(n - side, n) for c, n in zip(corner, labels.shape, strict=True)
    )
    assert not (labels[block] > 0).any(), "the cube must lie in background"
    labels[block] = 4
    _, stray = assign_regions(labels, ph.spacing)
    for name, value in clean["femoral_landmarks_mm"].items():
        assert abs(stray["femoral_landmarks_mm"][name] - value) < 0.5, (
            name,
            value,
            stray["femoral_landmarks_mm"],
        )


def test_region_volumes_are_the_map_counts(
    medium: list[tuple[Phantom, dict[str, Any], np.ndarray | None]],
) -> None:
    for ph, m, region_map in medium:
        voxel = float(np.prod(ph.spacing))
        assert set(m["regions"]) == set(REGIONS_BY_NAME)
        for name, entry in m["regions"].items():
            assert set(MEASUREMENT_KEYS) - {"t2_ms"} <= set(entry)
            n = int((region_map == entry["label"]).sum())
            assert entry["voxels"] == n and entry["volume_mm3"] == pytest.approx(n * voxel)
            # within 15 % of the truth region's volume (its boundaries differ by a voxel or so)
            assert entry["volume_mm3"] == pytest.approx(ph.truth["regions"][name]["volume_mm3"], rel=0.15)
            if entry["status"] == MEASURED:
                assert entry["reason"] is None and entry["thickness_mm"]["samples"] >= 10
                assert entry["interface_area_mm2"] > 0
            else:
                assert entry["thickness_mm"] is None and entry["reason"]
        # The regions of a cartilage add up to it, volume and interface area.
        for tissue in ("femoral_cartilage", "medial_tibial_cartilage", "patellar_cartilage"):
            parts = [e for e in m["regions"].values() if e["tissue"] == tissue]
            assert sum(e["voxels"] for e in parts) == m["tissues"][tissue]["voxels"]
            areas = [e["interface_area_mm2"] or 0.0 for e in parts]
            assert sum(areas) == pytest.approx(m["tissues"][tissue]["interface_area_mm2"], rel=1e-9)


def test_region_thickness_full_size_against_truth(full: dict[str, tuple[Phantom, dict[str, Any]]]) -> None:
    ph, m = full["baseline"]
    errors = []
    for name, entry in m["regions"].items():
        truth = ph.truth["regions"][name]["thickness_mm"]
        assert entry["status"] == MEASURED, (name, entry["reason"])
        for stat in ("mean", "median"):
            error = entry["thickness_mm"][stat] / truth - 1.0
            assert abs(error) <= 0.10, (name, stat, round(error, 4))
        errors.append(abs(entry["thickness_mm"]["mean"] / truth - 1.0))
    assert float(np.median(errors)) <= 0.05, errors


def test_follow_up_change_in_the_thinned_region_only(full: dict[str, tuple[Phantom, dict[str, Any]]]) -> None:
    (base, m0), (follow, m1) = full["baseline"], full["follow_up"]
    assert follow.truth["regions"][THINNED]["thickness_mm"] == pytest.approx(
        base.truth["regions"][THINNED]["thickness_mm"] - THINNING_MM
    )
    assert (
        follow.truth["regions"][THINNED]["baseline_thickness_mm"]
        == base.truth["regions"][THINNED]["thickness_mm"]
    )
    for name in REGIONS_BY_NAME:
        change = m1["regions"][name]["thickness_mm"]["mean"] - m0["regions"][name]["thickness_mm"]["mean"]
        truth = follow.truth["regions"][name]["thickness_mm"] - base.truth["regions"][name]["thickness_mm"]
        if name == THINNED:
            assert abs(change - truth) <= 0.1, (name, change)
        else:
            assert truth == 0.0
            assert abs(change) < 0.05, (name, change)


def test_follow_up_is_a_later_study_of_the_same_patient(tmp_path: Path) -> None:
    import pydicom

    base = generate(7, "small", "coronal", "R")
    follow = generate(7, "small", "coronal", "R", thinning={"lateral_tibial_central": 0.4})
    assert base.meta["patient"]["id"] == follow.meta["patient"]["id"]
    assert follow.meta["patient"]["study_date"] > base.meta["patient"]["study_date"]
    for key in ("study", "series", "frame_of_reference"):
        assert base.meta["uids"][key] != follow.meta["uids"][key]
    assert follow.truth["thinning_mm"] == {"lateral_tibial_central": 0.4} and base.truth["thinning_mm"] == {}
    assert follow.truth["visit"] == 1 and "visit" not in base.truth
    # the baseline's anatomy is unchanged outside the thinned region's cartilage
    changed = base.labels != follow.labels
    assert changed.any() and np.all(np.isin(base.labels[changed], [0, 6]))
    from openmsk.phantom import write_series

    paths = write_series(follow, tmp_path)
    ds = pydicom.dcmread(paths["dicom_files"][0], stop_before_pixels=True)
    assert ds.PatientID == base.meta["patient"]["id"] and ds.StudyInstanceUID == follow.meta["uids"]["study"]
    assert json.loads(paths["truth"].read_text())["regions"]["lateral_tibial_central"]["thickness_mm"] == (
        pytest.approx(follow.truth["regions"]["lateral_tibial_central"]["baseline_thickness_mm"] - 0.4)
    )
    with pytest.raises(ValueError, match="unknown subregion"):
        generate(7, "small", "coronal", "R", thinning={"femoral_middle": 0.3})
    with pytest.raises(ValueError, match="thinning"):
        generate(7, "small", "coronal", "R", thinning={"patellar_medial": 9.0})


def test_missing_femur_makes_every_region_not_measurable(
    small: tuple[Phantom, dict[str, Any], np.ndarray | None],
) -> None:
    ph = small[0]
    labels = ph.labels.copy()
    labels[labels == 1] = 0
    m, region_map = analyse_with_regions(labels, ph.spacing)
    assert region_map is None
    assert m["tissues"]["tibia"]["volume_mm3"] > 0  # the rest is still measured
    for entry in m["regions"].values():
        assert entry["status"] == NOT_MEASURABLE and "femur" in entry["reason"]
        assert entry["volume_mm3"] is None and entry["thickness_mm"] is None
    with pytest.raises(NoFrame, match="femur"):
        knee_frame(labels, ph.spacing)


def test_missing_cartilage_makes_its_regions_not_measurable(
    small: tuple[Phantom, dict[str, Any], np.ndarray | None],
) -> None:
    ph = small[0]
    labels = ph.labels.copy()
    labels[labels == 7] = 0  # no patellar cartilage
    m, _ = analyse_with_regions(labels, ph.spacing)
    for name in ("patellar_medial", "patellar_lateral"):
        entry = m["regions"][name]
        assert entry["status"] == NOT_MEASURABLE and "patellar cartilage" in entry["reason"]
        assert entry["volume_mm3"] is None
    assert m["regions"]["femoral_anterior"]["volume_mm3"] > 0


def test_report_carries_the_regions(
    small: tuple[Phantom, dict[str, Any], np.ndarray | None], tmp_path: Path
) -> None:
    m = small[1]
    m = json.loads(json.dumps(m))  # as the analysis process hands it over
    m["regions"]["patellar_lateral"].update(
        volume_mm3=None, thickness_mm=None, interface_area_mm2=None, status=NOT_MEASURABLE, reason="test"
    )
    m["regions"]["femoral_anterior"]["t2_ms"] = {"mean": 40.0, "median": 39.0, "std": 5.0, "p95": 50.0}
    json_path, csv_path = write_report(m, {"model": "t"}, tmp_path)
    doc = json.loads(json_path.read_text())
    assert doc["schema"] == REPORT_SCHEMA == "openmsk.knee-report/2"
    assert set(doc["regions"]) == set(REGIONS_BY_NAME)
    assert "pymskt" in doc["method"]["regions"] and "0.6" in doc["method"]["regions"]
    assert doc["regions"]["patellar_lateral"]["volume_mm3"] is None
    with csv_path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["region"]]
    by = {(r["region"], r["measure"], r["statistic"]): r for r in rows}
    assert {r["region"] for r in rows} == set(REGIONS_BY_NAME)
    entry = m["regions"]["femoral_medial_central"]
    row = by[("femoral_medial_central", "thickness", "median")]
    assert float(row["value"]) == pytest.approx(entry["thickness_mm"]["median"], abs=5e-4)
    assert row["unit"] == "mm" and row["tissue"] == "femoral_cartilage" and row["status"] == entry["status"]
    assert float(by[("femoral_medial_central", "interface_area", "")]["value"]) == pytest.approx(
        entry["interface_area_mm2"], abs=5e-4
    )
    assert by[("femoral_anterior", "t2", "p95")]["unit"] == "ms"
    lost = by[("patellar_lateral", "volume", "")]
    assert lost["value"] == "" and lost["status"] == NOT_MEASURABLE
    assert ("patellar_lateral", "thickness", "mean") not in by


def test_job_page_and_api_rows_show_the_regions(
    small: tuple[Phantom, dict[str, Any], np.ndarray | None], tmp_path: Path
) -> None:
    """The rows ``GET /api/jobs/<id>`` gives as ``regions`` and the job page's table, from a real report."""
    from flask import Flask, render_template

    import web.pages
    from web.jobview import region_rows

    m = json.loads(json.dumps(small[1]))
    m["regions"]["patellar_lateral"].update(
        volume_mm3=None, thickness_mm=None, status=NOT_MEASURABLE, reason="no patellar cartilage segmented"
    )
    json_path, _ = write_report(m, {}, tmp_path)
    rows = region_rows(json.loads(json_path.read_text()))
    assert [r["label"] for r in rows] == sorted(REGIONS)
    central = next(r for r in rows if r["name"] == "femoral_medial_central")
    assert central["thickness"]["median"] == m["regions"]["femoral_medial_central"]["thickness_mm"]["median"]
    assert central["status"] == m["regions"]["femoral_medial_central"]["status"]

    app = Flask("test", template_folder=str(Path(web.pages.__file__).parent / "templates"))
    app.register_blueprint(web.pages.pages)  # its template filters
    with app.test_request_context():
        html = render_template("job_regions.html", detail={"regions": rows})
    assert html.count("<tr data-region=") == len(REGIONS)
    warning = html[html.index('id="regions-warning"') :]
    lost = [r for r in rows if r["status"] == NOT_MEASURABLE]
    assert f"{len(lost)} of {len(REGIONS)} subregions not measurable" in warning
    assert "Patellar cartilage, lateral facet (no patellar cartilage segmented)" in warning
    assert "Femoral cartilage, medial weight-bearing (" not in warning


def test_odd_segmentations_never_fail_the_analysis() -> None:
    """Blocks and specks instead of a knee: every region gets an entry, measured or with a reason."""
    rng = np.random.default_rng(3)
    for trial in range(4):
        labels = np.zeros((40, 36, 30), dtype=np.uint8)
        labels[5:35, 5:30, 16:28] = 1  # femur above
        labels[5:35, 5:30, 2:12] = 2  # tibia below
        for value in range(3, 10):
            for _ in range(trial + 1):
                i, j, k = rng.integers(0, 30), rng.integers(0, 30), rng.integers(0, 28)
                labels[i : i + 3, j : j + 3, k : k + 2] = value
        m, region_map = analyse_with_regions(labels, (1.0, 1.2, 1.5))
        assert set(m["regions"]) == set(REGIONS_BY_NAME)
        assert region_map is None or region_map.shape == labels.shape
        for entry in m["regions"].values():
            assert entry["status"] in (MEASURED, NOT_MEASURABLE)
            assert (entry["status"] == MEASURED) == (entry["reason"] is None)
            assert entry["volume_mm3"] is None or entry["volume_mm3"] > 0
        json.dumps(m, allow_nan=False)  # what report.json needs
