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
from openmsk.phantom.anatomy import WEIGHT_BEARING_FRACTION, Grid, KneeParams
from openmsk.phantom.contrast import contrast_params
from openmsk.regions import REGIONS

if TYPE_CHECKING:
    from openmsk.phantom import Phantom

REGION_RULE = (
    "from the phantom's construction in knee-local coordinates: femoral medial | lateral at the notch centre, "
    "anterior in front of the trochlear notch, weight-bearing over "
    f"{WEIGHT_BEARING_FRACTION:g} of the notch-to-posterior-end distance of each condyle, posterior behind "
    "(pymskt / Eckstein-Wirth); tibial thirds of each plateau's anterior-posterior extent; patellar medial | "
    "lateral at the sheet's midline"
)
VOXEL_ORDER = "[i, j, k]: i = column (along the DICOM row direction), j = row, k = slice (along the normal)"


def compute_truth(
    labels: NDArray[np.uint8],
    grid: Grid,
    knee: KneeParams,
    size: str,
    orientation: str,
    *,
    regions: NDArray[np.uint8] | None = None,
) -> dict[str, Any]:
    """The truth.json content for *labels* (and the subregion map *regions*) sampled on *grid*."""
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
    if regions is not None:
        truth.update(region_truth(regions, knee, voxel_mm3))
    return truth


def region_truth(regions: NDArray[np.uint8], knee: KneeParams, voxel_mm3: float) -> dict[str, Any]:
    """Per-subregion truth: voxels and volume of the phantom's own subregion map, and the sheet thickness it
    was built with there (the nominal thickness of its cartilage less any follow-up thinning).

    ``baseline_thickness_mm`` is the thickness at the baseline visit, so a follow-up's truth lists both.
    """
    counts = np.bincount(regions.ravel(), minlength=256)
    thinned = dict(knee.thinning_mm)
    out: dict[str, Any] = {}
    for label, region in REGIONS.items():
        nominal = knee.thickness_mm[region.parent.name]
        out[region.name] = {
            "label": label,
            "tissue": region.parent.name,
            "voxels": int(counts[label]),
            "volume_mm3": int(counts[label]) * voxel_mm3,
            "thickness_mm": round(nominal - thinned.get(region.name, 0.0), 4),
            "baseline_thickness_mm": nominal,
        }
    return {
        "regions": out,
        "region_rule": REGION_RULE,
        "thinning_mm": {name: mm for name, mm in knee.thinning_mm},
    }


def nifti_affine(affine_lps: NDArray[np.float64]) -> NDArray[np.float64]:
    """LPS voxel->patient affine to the RAS affine NIfTI expects."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


def write_labels_nifti(
    phantom: Phantom,
    path: str | Path,
    labels: NDArray[np.uint8] | None = None,
    intent_name: str = "openmsk labels",
) -> Path:
    """Save the labels (or another map on the phantom's grid, *labels*) as uint8 NIfTI with
    scanner-anatomical qform and sform."""
    import nibabel as nib

    path = Path(path)
    aff = nifti_affine(phantom.affine_lps)
    data = phantom.labels if labels is None else labels
    img = nib.Nifti1Image(np.asarray(data, dtype=np.uint8), aff)
    img.header.set_xyzt_units("mm")
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_intent("label", name=intent_name)
    nib.save(img, str(path))
    return path


def write_truth_json(phantom: Phantom, path: str | Path) -> Path:
    """Save truth.json (sorted keys, so files compare byte for byte across runs)."""
    path = Path(path)
    path.write_text(json.dumps(phantom.truth, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
