"""Ground truth of a phantom: ``truth.json`` (volumes, thicknesses, centroids) and ``labels.nii.gz``.

Volumes are label voxel counts × voxel volume, so a perfect segmentation reproduces them exactly; the
cartilage thicknesses are the nominal ones the sheets were built with. The NIfTI holds the labels in the
phantom's voxel order ``[i, j, k]`` with the DICOM affine converted from LPS to RAS (first two rows negated).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from openmsk.phantom import LABELS
from openmsk.phantom.anatomy import Grid, KneeParams
from openmsk.phantom.contrast import contrast_params

if TYPE_CHECKING:
    from openmsk.phantom import Phantom

VOXEL_ORDER = "[i, j, k]: i = column (along the DICOM row direction), j = row, k = slice (along the normal)"


def compute_truth(
    labels: NDArray[np.uint8], grid: Grid, knee: KneeParams, size: str, orientation: str
) -> dict[str, Any]:
    """The truth.json content for *labels* sampled on *grid*."""
    voxel_mm3 = float(grid.spacing[0] * grid.spacing[1] * grid.spacing[2])
    counts = np.bincount(labels.ravel(), minlength=max(LABELS) + 1)
    aff = grid.affine_lps
    volumes: dict[str, float] = {}
    centroids: dict[str, list[float] | None] = {}
    for value, name in LABELS.items():
        n = int(counts[value])
        volumes[name] = n * voxel_mm3
        if n == 0:
            centroids[name] = None
            continue
        mask = labels == value
        # Mean index per axis from per-plane counts: far cheaper than materialising index arrays.
        mean_ijk = [
            float(np.arange(labels.shape[ax]) @ mask.sum(axis=tuple(o for o in range(3) if o != ax))) / n
            for ax in range(3)
        ]
        centroid = aff[:3, :3] @ np.asarray(mean_ijk) + aff[:3, 3]
        centroids[name] = [round(float(c), 3) for c in centroid]
    medial = [knee.medial_sign, 0.0, 0.0]
    truth: dict[str, Any] = {
        "seed": knee.seed,
        "size": size,
        "orientation": orientation,
        "laterality": knee.laterality,
        "spacing_mm": [float(s) for s in grid.spacing],
        "shape": [int(n) for n in grid.shape],
        "voxel_order": VOXEL_ORDER,
        "voxel_volume_mm3": voxel_mm3,
        "labels": {str(k): v for k, v in LABELS.items()},
        "voxel_counts": {name: int(counts[value]) for value, name in LABELS.items()},
        "volumes_mm3": volumes,
        "cartilage_thickness_mm": dict(knee.thickness_mm),
        "centroids_mm": centroids,
        "knee_centre_mm": list(knee.centre_lps),
        "medial_direction_lps": medial,
        "anatomy_scale": knee.scale,
        "noise_sigma": round(float(contrast_params(knee.seed)["noise_sigma"]), 3),  # type: ignore[arg-type]
        "affine_lps": [[float(v) for v in row] for row in aff],
    }
    if orientation == "oblique":
        truth["oblique_deg"] = knee.oblique_deg
    return truth


def nifti_affine(affine_lps: NDArray[np.float64]) -> NDArray[np.float64]:
    """LPS voxel->patient affine to the RAS affine NIfTI expects."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


def write_labels_nifti(phantom: Phantom, path: str | Path) -> Path:
    """Save the labels as uint8 NIfTI with scanner-anatomical qform and sform."""
    import nibabel as nib

    path = Path(path)
    aff = nifti_affine(phantom.affine_lps)
    img = nib.Nifti1Image(np.asarray(phantom.labels, dtype=np.uint8), aff)
    img.header.set_xyzt_units("mm")
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_intent("label", name="openmsk labels")
    nib.save(img, str(path))
    return path


def write_truth_json(phantom: Phantom, path: str | Path) -> Path:
    """Save truth.json (sorted keys, so files compare byte for byte across runs)."""
    path = Path(path)
    path.write_text(json.dumps(phantom.truth, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
