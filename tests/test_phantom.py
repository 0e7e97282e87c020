"""Tests of the synthetic knee phantom, checked through the files it writes (read back with pydicom/nibabel).

What matters to users of the phantom: the DICOM series and labels.nii.gz describe one patient space in every
orientation and for both knees; the truth matches the labels; medial/lateral and anterior follow the patient
axes; the same seed gives the same bytes; and the DICOM passes dciodvfy.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from openmsk.phantom import LABELS, Phantom, generate, write_series

ORIENTATIONS = ("sagittal", "coronal", "axial", "oblique")
LATERALITIES = ("R", "L")
CASES = [(o, lat) for o in ORIENTATIONS for lat in LATERALITIES]
SEED = 11
NAME_TO_VALUE = {name: value for value, name in LABELS.items()}


@pytest.fixture(scope="module")
def written(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, str], tuple[Phantom, dict[str, Any]]]:
    """One small series per orientation and knee, written to disk once for the whole module."""
    out = {}
    for orientation, laterality in CASES:
        ph = generate(seed=SEED, size="small", orientation=orientation, laterality=laterality)
        out[(orientation, laterality)] = (
            ph,
            write_series(ph, tmp_path_factory.mktemp(f"{orientation}_{laterality}")),
        )
    return out


def _read_series(paths: dict[str, Any]) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(p) for p in sorted(Path(paths["dicom_dir"]).glob("*.dcm"))]
    return sorted(datasets, key=lambda ds: int(ds.InstanceNumber))


def _read_labels(paths: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(paths["labels"]))
    return np.asarray(img.dataobj), img.affine


def _centroids_lps(data: np.ndarray, affine_ras: np.ndarray) -> dict[str, np.ndarray]:
    """Label centroids in LPS from the NIfTI alone (independent of the phantom's own truth)."""
    out = {}
    for value, name in LABELS.items():
        idx = np.argwhere(data == value)
        ras = affine_ras @ np.r_[idx.mean(axis=0), 1.0]
        out[name] = ras[:3] * np.array([-1.0, -1.0, 1.0])
    return out


@pytest.mark.parametrize(("orientation", "laterality"), CASES)
def test_dicom_and_labels_share_one_patient_space(
    written: dict[tuple[str, str], tuple[Phantom, dict[str, Any]]], orientation: str, laterality: str
) -> None:
    ph, paths = written[(orientation, laterality)]
    datasets = _read_series(paths)
    data, affine_ras = _read_labels(paths)
    nx, ny, nz = ph.image.shape

    assert len(datasets) == nz
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, nz + 1))
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == nz
    first = datasets[0]
    assert first.SOPClassUID == pydicom.uid.MRImageStorage
    assert (first.Modality, first.BodyPartExamined, first.Laterality) == ("MR", "KNEE", laterality)
    assert first.MRAcquisitionType == "3D" and "DESS" in first.SeriesDescription
    assert (int(first.Rows), int(first.Columns)) == (ny, nx)

    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    assert all(np.allclose([float(v) for v in ds.ImageOrientationPatient], iop) for ds in datasets)
    row_dir, col_dir = iop[:3], iop[3:]
    assert np.isclose(row_dir @ col_dir, 0.0, atol=1e-6)
    normal = np.cross(row_dir, col_dir)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    between = float(first.SpacingBetweenSlices)
    ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    # Slices are stacked along row × column at SpacingBetweenSlices, as the NIfTI's third axis must be.
    assert np.allclose(np.diff(ipp, axis=0), between * normal, atol=1e-4)

    assert data.shape == (nx, ny, nz) and data.dtype == np.uint8
    assert np.array_equal(data, ph.labels)
    rng = np.random.default_rng(0)
    voxels = [(0, 0, 0), (nx - 1, 0, 0), (0, ny - 1, 0), (0, 0, nz - 1), (nx - 1, ny - 1, nz - 1)]
    voxels += [tuple(int(x) for x in rng.integers(0, (nx, ny, nz))) for _ in range(20)]
    for i, j, k in voxels:
        ras = affine_ras @ np.array([i, j, k, 1.0])
        lps = ras[:3] * np.array([-1.0, -1.0, 1.0])
        expected = ipp[k] + i * col_spacing * row_dir + j * row_spacing * col_dir
        assert np.allclose(lps, expected, atol=1e-3), (i, j, k, lps, expected)

    # Pixel data: row j, column i of slice k is image[i, j, k].
    for k in (0, nz // 2, nz - 1):
        assert np.array_equal(datasets[k].pixel_array, ph.image[:, :, k].T)


@pytest.mark.parametrize("laterality", LATERALITIES)
def test_labels_agree_across_orientations_in_patient_space(
    written: dict[tuple[str, str], tuple[Phantom, dict[str, Any]]], laterality: str
) -> None:
    """Every orientation samples the same knee: its labelled voxels land on the same labels in sagittal."""
    ref_data, ref_affine = _read_labels(written[("sagittal", laterality)][1])
    to_ref = np.linalg.inv(ref_affine)
    for orientation in ("coronal", "axial", "oblique"):
        data, affine = _read_labels(written[(orientation, laterality)][1])
        idx = np.argwhere(data > 0)
        ref_idx = np.rint(np.c_[idx, np.ones(len(idx))] @ (to_ref @ affine).T)[:, :3].astype(int)
        inside = np.all((ref_idx >= 0) & (ref_idx < ref_data.shape), axis=1)
        assert inside.mean() > 0.95
        got = ref_data[tuple(ref_idx[inside].T)]
        want = data[tuple(idx[inside].T)]
        assert (got == want).mean() > 0.9, orientation
        for value in LABELS:  # thin sheets blur at 1.6–2.4 mm, but a mirrored or shifted knee scores near 0
            assert (got[want == value] == value).mean() > 0.6, (orientation, LABELS[value])


@pytest.mark.parametrize(("orientation", "laterality"), CASES)
def test_truth_matches_labels(
    written: dict[tuple[str, str], tuple[Phantom, dict[str, Any]]], orientation: str, laterality: str
) -> None:
    ph, paths = written[(orientation, laterality)]
    truth = json.loads(Path(paths["truth"]).read_text())
    data, affine_ras = _read_labels(paths)
    first = _read_series(paths)[0]

    assert (truth["seed"], truth["size"], truth["orientation"], truth["laterality"]) == (
        SEED,
        "small",
        orientation,
        laterality,
    )
    assert truth["labels"] == {str(k): v for k, v in LABELS.items()}
    assert truth["shape"] == list(data.shape)
    spacing = truth["spacing_mm"]
    assert np.allclose(
        spacing,
        [float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), float(first.SpacingBetweenSlices)],
    )
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    counts = np.bincount(data.ravel(), minlength=10)
    for value, name in LABELS.items():
        assert counts[value] > 0, f"{name} missing"
        assert truth["volumes_mm3"][name] == pytest.approx(counts[value] * voxel_mm3, rel=1e-12)
    assert set(counts.nonzero()[0]) <= set(range(10))
    thickness = truth["cartilage_thickness_mm"]
    assert set(thickness) == {
        "femoral_cartilage",
        "medial_tibial_cartilage",
        "lateral_tibial_cartilage",
        "patellar_cartilage",
    }
    assert all(1.5 <= t <= 3.0 for t in thickness.values())
    mine = _centroids_lps(data, affine_ras)
    for name, centroid in truth["centroids_mm"].items():
        assert np.allclose(centroid, mine[name], atol=0.01), name
    assert truth == ph.truth


@pytest.mark.parametrize(("orientation", "laterality"), CASES)
def test_medial_lateral_and_anterior_follow_patient_axes(
    written: dict[tuple[str, str], tuple[Phantom, dict[str, Any]]], orientation: str, laterality: str
) -> None:
    """LPS: a right knee's medial side is patient left (+x), a left knee's patient right (-x); -y anterior."""
    _, paths = written[(orientation, laterality)]
    truth = json.loads(Path(paths["truth"]).read_text())
    centre_x = truth["knee_centre_mm"][0]
    c = _centroids_lps(*_read_labels(paths))
    medial_sign = 1.0 if laterality == "R" else -1.0
    for name in ("medial_meniscus", "medial_tibial_cartilage"):
        assert (c[name][0] - centre_x) * medial_sign > 5.0, name
    for name in ("lateral_meniscus", "lateral_tibial_cartilage"):
        assert (c[name][0] - centre_x) * medial_sign < -5.0, name
    assert c["patella"][1] < c["patellar_cartilage"][1] < c["femur"][1]  # patella in front of the femur
    assert c["tibia"][2] < c["medial_tibial_cartilage"][2] < c["femoral_cartilage"][2] < c["femur"][2]
    # Menisci sit between femur and tibia, on their own plateau.
    for side in ("medial", "lateral"):
        assert c[f"{side}_tibial_cartilage"][2] < c[f"{side}_meniscus"][2] < c["femur"][2]


def test_dess_like_contrast(written: dict[tuple[str, str], tuple[Phantom, dict[str, Any]]]) -> None:
    ph, _ = written[("axial", "R")]
    mean = {name: ph.image[ph.labels == value].mean() for value, name in LABELS.items()}
    assert mean["femoral_cartilage"] > mean["femur"] > mean["medial_meniscus"]
    assert mean["patellar_cartilage"] > 1.5 * mean["patella"]
    corners = ph.image[[0, 0, -1, -1], [0, -1, 0, -1], :]  # outside the leg in an axial slice
    assert corners.mean() < 0.1 * mean["femoral_cartilage"]
    assert ph.image.dtype == np.uint16


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    a = generate(seed=3, size="small", orientation="oblique", laterality="L")
    b = generate(seed=3, size="small", orientation="oblique", laterality="L")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.meta["uids"] == b.meta["uids"]
    pa, pb = write_series(a, tmp_path / "a"), write_series(b, tmp_path / "b")
    for fa, fb in zip(pa["dicom_files"], pb["dicom_files"], strict=True):
        assert fa.read_bytes() == fb.read_bytes()
    assert pa["truth"].read_bytes() == pb["truth"].read_bytes()

    c = generate(seed=4, size="small", orientation="oblique", laterality="L")
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.labels, c.labels)
    assert a.truth["cartilage_thickness_mm"] != c.truth["cartilage_thickness_mm"]
    assert a.meta["uids"]["series"] != c.meta["uids"]["series"]
    assert a.meta["uids"]["study"] != c.meta["uids"]["study"]


def test_cropped_evaluation_equals_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluating each structure only near itself is an optimisation: it must not change a single voxel."""
    from openmsk.phantom import anatomy

    fast = generate(seed=5, size="small", orientation="oblique", laterality="L")
    monkeypatch.setattr(anatomy._Slab, "crop", lambda self, lo, hi: tuple(slice(0, n) for n in self.shape))
    slow = generate(seed=5, size="small", orientation="oblique", laterality="L")
    assert np.array_equal(fast.labels, slow.labels)
    assert np.array_equal(fast.image, slow.image)


@pytest.mark.parametrize(("orientation", "laterality"), [("sagittal", "R"), ("oblique", "L")])
def test_dciodvfy_reports_no_errors(
    written: dict[tuple[str, str], tuple[Phantom, dict[str, Any]]], orientation: str, laterality: str
) -> None:
    dciodvfy = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
    assert Path(dciodvfy).exists(), "dciodvfy (Debian package dicom3tools) is required"
    _, paths = written[(orientation, laterality)]
    files = paths["dicom_files"]
    for path in (files[0], files[len(files) // 2]):
        result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        report = result.stdout + result.stderr
        assert "MRImage" in report  # it recognised the IOD, so the module checks really ran
        errors = [line for line in report.splitlines() if re.match(r"\s*Error", line)]
        assert not errors, "\n".join(errors)


def test_cli_writes_a_series(tmp_path: Path) -> None:
    from openmsk.phantom import cli

    parser = argparse.ArgumentParser(prog="openmsk")
    cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "ph"
    args = parser.parse_args(
        [
            "phantom",
            str(out),
            "--seed",
            "2",
            "--size",
            "small",
            "--orientation",
            "coronal",
            "--laterality",
            "L",
        ]
    )
    assert args.func(args) == 0
    truth = json.loads((out / "truth.json").read_text())
    assert (truth["seed"], truth["orientation"], truth["laterality"]) == (2, "coronal", "L")
    assert len(list((out / "dicom").glob("IM*.dcm"))) == 40
    assert (out / "labels.nii.gz").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["phantom", str(out), "--orientation", "diagonal"])


def test_cli_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, openmsk.phantom.cli; print(sorted({'numpy', 'pydicom', 'nibabel'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_full_size_series() -> None:
    """The clinical grid (384 × 384 × 160 at 0.36 × 0.36 × 0.7 mm): every label, true cartilage thickness."""
    ph = generate(seed=1, size="full", orientation="sagittal", laterality="R")
    assert ph.image.shape == ph.labels.shape == (384, 384, 160)
    assert ph.spacing == pytest.approx((0.36, 0.36, 0.7))
    counts = np.bincount(ph.labels.ravel(), minlength=10)
    assert all(counts[v] > 0 for v in LABELS)
    # Sagittal rows run superior→inferior, so a column's tibial cartilage voxel count × row spacing is the
    # sheet's vertical extent, which the phantom builds equal to the nominal thickness.
    for name in ("medial_tibial_cartilage", "lateral_tibial_cartilage"):
        per_column = (ph.labels == NAME_TO_VALUE[name]).sum(axis=1)
        measured = np.median(per_column[per_column > 0]) * ph.spacing[1]
        assert measured == pytest.approx(ph.truth["cartilage_thickness_mm"][name], abs=0.4), name
