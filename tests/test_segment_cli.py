"""``openmsk segment``: the worker's stages once, from the shell, on a DICOM folder, a zip or a NIfTI file;
progress on stderr, the files written listed on stdout, and a one-line error with an exit code for bad input.

The fast ``dosma_2d`` demo model keeps this quick; the stages are the same for every model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from openmsk.config import REPO_DIR
from openmsk.phantom import generate, write_series
from tests.quality import dice

MODEL = "dosma_2d"
MAPS = ("femoral", "tibial", "patellar")  # worker/thickness_maps.py: one per cartilage found
RESULTS = {"labels.nii.gz", "regions.nii.gz", "preview.png", "report.json", "report.csv", "manifest.json"} | {
    f"thickness_{name}.png" for name in MAPS
}
DICOM_RESULTS = {"seg.dcm", "seg_regions.dcm", "sr.dcm"} | {f"thickness_{name}.dcm" for name in MAPS}


def _segment(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENMSK_")}
    env["OPENMSK_DATA_DIR"] = str(cwd / "data")
    env["OPENMSK_MODEL_REGISTRY"] = str(REPO_DIR / "models" / "registry.toml")
    return subprocess.run(
        [sys.executable, "-m", "openmsk", "segment", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_series(generate(seed=23, size="small", orientation="coronal", laterality="L"),
                        tmp_path_factory.mktemp("phantom"))  # fmt: skip


def test_dicom_folder_gives_every_output(series: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = _segment(series["dicom_dir"], "--model", MODEL, "--out", out, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    listed = {Path(line).name for line in run.stdout.split()}
    assert listed == RESULTS | DICOM_RESULTS == {p.name for p in out.iterdir()}
    for stage in ("load", "infer", "write", "analyse"):
        assert stage in run.stderr  # the progress bar names each stage as it runs
    assert "100%" in run.stderr

    # labels on the source grid, close to the truth; the SEG references the source series
    truth = np.asarray(nib.load(series["labels"]).dataobj)
    found = np.asarray(nib.load(out / "labels.nii.gz").dataobj)
    assert found.shape == truth.shape
    assert dice(truth == 1, found == 1) > 0.9  # femur: a flipped or shuffled grid would score near 0
    seg = pydicom.dcmread(out / "seg.dcm", stop_before_pixels=True)
    source = pydicom.dcmread(next(series["dicom_dir"].iterdir()), stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    referenced = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert referenced == source.SeriesInstanceUID
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["model"] == MODEL

    # a second run writes the same SEG identity (idempotent UIDs)
    again = _segment(series["dicom_dir"], "--model", MODEL, "--out", tmp_path / "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    seg2 = pydicom.dcmread(tmp_path / "again" / "seg.dcm", stop_before_pixels=True)
    assert (seg2.SeriesInstanceUID, seg2.SOPInstanceUID) == (seg.SeriesInstanceUID, seg.SOPInstanceUID)


def test_zip_of_a_series(series: dict[str, Path], tmp_path: Path) -> None:
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(series["dicom_dir"].iterdir()):
            zf.write(path, f"study/{path.name}")
    run = _segment(archive, "--model", MODEL, "--out", tmp_path / "out", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert {Path(line).name for line in run.stdout.split()} == RESULTS | DICOM_RESULTS


def test_nifti_gives_no_dicom_outputs(series: dict[str, Path], tmp_path: Path) -> None:
    # The phantom's image as NIfTI (RAS affine), as a researcher would hand it over.
    phantom = generate(seed=23, size="small", orientation="coronal", laterality="L")
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ phantom.affine_lps
    image = tmp_path / "knee.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image.astype(np.int16), ras), str(image))
    out = tmp_path / "out"
    run = _segment(image, "--model", MODEL, "--out", out, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert {p.name for p in out.iterdir()} == RESULTS
    found = np.asarray(nib.load(out / "labels.nii.gz").dataobj)
    assert dice(phantom.labels == 1, found == 1) > 0.9


@pytest.mark.parametrize(
    ("make_input", "model", "code", "message"),
    [
        (lambda d: d / "missing", MODEL, 1, r"missing does not exist"),
        (lambda d: (d / "notes.txt", (d / "notes.txt").write_text("hello"))[0], MODEL, 1,
         r"notes\.txt is neither DICOM, a zip, NIfTI nor NRRD"),
        (lambda d: d, "no_such_model", 2, r"unknown model 'no_such_model'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line(
    tmp_path: Path, make_input: object, model: str, code: int, message: str
) -> None:
    target = make_input(tmp_path)  # type: ignore[operator]
    run = _segment(target, "--model", model, "--out", tmp_path / "out", cwd=tmp_path)
    assert run.returncode == code
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("openmsk: ") and "Traceback" not in run.stderr
    assert re.search(message, last), last
    assert not (tmp_path / "out" / "seg.dcm").exists()
