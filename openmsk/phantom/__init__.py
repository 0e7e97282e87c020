"""Synthetic knee MRI phantoms with exact ground truth, for tests, demos and benchmarks without patient data.

A phantom is an analytic knee (bones, cartilage sheets, menisci, soft tissue) defined in DICOM patient
space (LPS, mm), sampled on the voxel grid of one 3D DESS-like MR series. Because the label of every voxel
comes from evaluating the anatomy at that voxel's patient coordinates, labels and image agree exactly in
every orientation.

Voxel order of :attr:`Phantom.image` and :attr:`Phantom.labels` is ``[i, j, k]``: ``i`` = column (along the
DICOM row direction), ``j`` = row (along the column direction), ``k`` = slice (along row × column), the usual
dcm2niix/ITK order. ``affine_lps @ [i, j, k, 1]`` is the voxel centre in patient LPS mm.

This module imports nothing heavy so that ``openmsk.phantom.cli`` stays cheap to import; numpy and pydicom are
loaded when :func:`generate` or :func:`write_series` runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openmsk.labels import TISSUES
from openmsk.regions import REGIONS_BY_NAME

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

# The canonical label map (segmentation output and phantom truth use the same numbers), from the tissue table.
LABELS: dict[int, str] = {label: t.name for label, t in TISSUES.items()}

SIZES = ("small", "medium", "full")
ORIENTATIONS = ("sagittal", "coronal", "axial", "oblique")
LATERALITIES = ("R", "L")


@dataclass(frozen=True)
class Phantom:
    """One generated series: pixels, labels on the same grid, its geometry, ground truth and metadata."""

    image: NDArray[np.uint16]  # (nx, ny, nz) = (columns, rows, slices)
    labels: NDArray[np.uint8]  # same shape and grid as image
    affine_lps: NDArray[np.float64]  # 4x4, voxel index [i, j, k, 1] -> patient LPS mm
    spacing: tuple[float, float, float]  # mm along i, j, k
    truth: dict[str, Any]  # exactly what truth.json holds
    meta: dict[str, Any]  # seed, size, orientation, laterality, uids, patient, grid directions
    regions: NDArray[np.uint8] | None = None  # cartilage subregions (openmsk.regions labels), 0 elsewhere


def generate(
    seed: int = 0,
    size: str = "small",
    orientation: str = "sagittal",
    laterality: str = "R",
    *,
    thinning: Mapping[str, float] | None = None,
    visit: int | None = None,
) -> Phantom:
    """Build a phantom; the same arguments always give byte-identical pixels and the same UIDs.

    *thinning* makes a follow-up of the same knee: the cartilage of each named subregion
    (:data:`openmsk.regions.REGIONS_BY_NAME`) is that many mm thinner than at the baseline. *visit* numbers
    the visit (0 = baseline; default 1 with thinning, else 0): a later visit is the same patient (same
    PatientID, same anatomy) in a new study (new study, series and frame-of-reference UIDs) a year per visit
    later, and its truth.json lists the baseline and the follow-up thickness per subregion.
    """
    from openmsk.phantom.anatomy import knee_params, make_grid, sample_anatomy
    from openmsk.phantom.contrast import synthesize
    from openmsk.phantom.dicom import series_meta
    from openmsk.phantom.truth import compute_truth

    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)  # numpy integers too; UIDs and truth.json need a plain int
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if laterality not in LATERALITIES:
        raise ValueError(f"laterality must be one of {LATERALITIES}, got {laterality!r}")

    knee = knee_params(seed, laterality)
    thin = _check_thinning(thinning, knee.thickness_mm)
    if visit is None:
        visit = 1 if thin else 0
    if isinstance(visit, bool) or not isinstance(visit, Integral) or visit < 0:
        raise ValueError(f"visit must be a non-negative integer, got {visit!r}")
    knee = replace(knee, thinning_mm=thin)
    grid = make_grid(size, orientation, knee)
    sampled = sample_anatomy(grid, knee)
    image = synthesize(sampled, knee)
    meta = series_meta(seed, size, orientation, laterality, grid, visit=int(visit))
    truth = compute_truth(sampled.labels, grid, knee, size, orientation, regions=sampled.regions)
    if visit:
        truth["visit"] = int(visit)
    return Phantom(
        image=image,
        labels=sampled.labels,
        affine_lps=grid.affine_lps,
        spacing=grid.spacing,
        truth=truth,
        meta=meta,
        regions=sampled.regions,
    )


def _check_thinning(
    thinning: Mapping[str, float] | None, nominal: Mapping[str, float]
) -> tuple[tuple[str, float], ...]:
    """*thinning* as sorted (region, mm) pairs; each region known and left at least 0.5 mm of cartilage."""
    if not thinning:
        return ()
    out = []
    for name, mm in sorted(thinning.items()):
        if name not in REGIONS_BY_NAME:
            raise ValueError(f"unknown subregion {name!r}; known: {sorted(REGIONS_BY_NAME)}")
        tissue = REGIONS_BY_NAME[name].parent.name
        if not isinstance(mm, int | float) or not 0.0 <= float(mm) <= nominal[tissue] - 0.5:
            raise ValueError(
                f"thinning of {name} must be 0..{nominal[tissue] - 0.5:.2f} mm (leaving 0.5 mm), got {mm!r}"
            )
        out.append((name, float(mm)))
    return tuple(out)


def write_series(phantom: Phantom, out_dir: str | Path) -> dict[str, Any]:
    """Write ``dicom/IM0001.dcm…``, ``labels.nii.gz`` and ``truth.json`` under *out_dir*; return their paths.

    The returned dict has ``dicom_dir`` (Path), ``dicom_files`` (list of Path, slice order), ``labels``,
    ``regions`` (the truth subregion map, ``regions.nii.gz``) and ``truth`` (Path).
    """
    from openmsk.phantom.dicom import write_dicom_series
    from openmsk.phantom.truth import write_labels_nifti, write_truth_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = write_dicom_series(phantom, out / "dicom")
    paths = {
        "dicom_dir": out / "dicom",
        "dicom_files": files,
        "labels": write_labels_nifti(phantom, out / "labels.nii.gz"),
        "truth": write_truth_json(phantom, out / "truth.json"),
    }
    if phantom.regions is not None:
        paths["regions"] = write_labels_nifti(
            phantom, out / "regions.nii.gz", phantom.regions, "openmsk subregions"
        )
    return paths


__all__ = ["LABELS", "LATERALITIES", "ORIENTATIONS", "SIZES", "Phantom", "generate", "write_series"]
