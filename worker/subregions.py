"""Cartilage subregions from an anatomical knee frame found in the segmented bones.

The frame (:func:`knee_frame`) comes from the segmentation, never from the image axes, so the same knee gives
the same regions in sagittal, coronal, axial and oblique series and in left and right knees:

* superior (``u``): the tibial shaft axis, from the centroid of the distal 30 % of the tibia in view to that
  of the next 30 % (along the first guess, tibia → femur centroids; refined three times). Where less than
  30 mm of tibia is in view, the line from the tibia's distal 30 % to the femur's proximal 30 % instead (the
  shafts are near collinear in an extended knee). On the phantoms the tibial shaft is within 0.4° of the
  true axis, the femur-tibia line 1.5-1.8° off (the condyles pull the femur's centroid back);
* medial (``m``): the major axis of the proximal tibia's cross-section (the plateau is wider than deep),
  orthogonal to ``u``, pointing from the lateral tibial cartilage (label 6; the lateral meniscus, 9, where it
  is missing) to the medial one (5, or 8): this settles laterality, so a left knee needs nothing else;
* anterior (``a``): ``u × m`` or its opposite, whichever points from the femur to the patella (without a
  patella: away from the posterior condyles, which reach farther behind the shaft than the trochlea in
  front of it). Origin: the centroid of the femoral shaft part.

Regions (:func:`assign_regions`), following the scheme of pymskt (the library of the original service) and
Eckstein/Wirth's weight-bearing femoral subregions (cMF/cLF: 60 % of the distance from the trochlear notch to
the posterior end of the condyle):

* femoral cartilage (label 4): medial | lateral at the intercondylar notch (the centre of the gap between the
  condyles' cartilage, behind the shaft axis: bins under a quarter of the condyles' count); anterior
  (trochlea, 11) in front of the trochlear notch (the most posterior cartilage in the notch columns in front
  of the shaft axis); weight-bearing (12 medial, 13 lateral) from the notch back over
  ``WEIGHT_BEARING_FRACTION`` = 0.6 of the distance to the most posterior cartilage of that condyle;
  posterior (14, 15) behind. The landmarks come from the cartilage pieces that touch the femur. pymskt's
  extra rule (in the weight-bearing band, voxels high up the condyle count as posterior) is not applied: the
  boundary is a plane of the frame.
* tibial cartilage (labels 5, 6): anterior / central / posterior thirds of each plateau's extent along ``a``
  (0.5th to 99.5th percentile of its voxels, so stray voxels do not move it).
* patellar cartilage (label 7): medial (31) | lateral (32) facet at the cartilage's centre of mass along ``m``.

Everything is vectorised NumPy on the cartilage voxels plus a strided sample of the bones (every voxel of
about 1.5 mm); on a full-size knee (384 × 384 × 160) it takes a small fraction of a second (bench/analysis.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from openmsk.labels import BY_NAME
from openmsk.regions import REGIONS_BY_NAME

__all__ = [
    "REGION_METHOD",
    "WEIGHT_BEARING_FRACTION",
    "KneeFrame",
    "NoFrame",
    "assign_regions",
    "knee_frame",
]

#: Share of the notch → posterior-end distance that is weight-bearing (pymskt's default, Eckstein/Wirth cMF).
WEIGHT_BEARING_FRACTION = 0.6
#: Share of the femur's extent along the shaft whose centroid is the frame's origin.
_SHAFT_FRACTION = 0.3
#: Below this much tibia along the axis (mm), its shaft is too short to give the axis alone.
_MIN_TIBIAL_SHAFT_MM = 30.0
#: The bones are sampled at about this step (mm) for the frame: plenty for centroids, 30× fewer voxels.
_BONE_STEP_MM = 1.5
#: Percentiles of a plateau's extent along ``a`` (robust to stray voxels).
_EXTENT_PERCENTILES = (0.5, 99.5)
#: The notch is looked for within this distance (mm) of the shaft axis.
_NOTCH_SEARCH_MM = 25.0
#: Share of the condyles' cartilage count (90th percentile of the m bins behind the axis) under which a bin is
#: part of the gap between them.
_NOTCH_GAP_FRACTION = 0.25

REGION_METHOD = (
    "subregions in an anatomical frame from the segmented bones (superior: tibial to femoral shaft "
    "centroids; medial: lateral to medial tibial compartment; anterior: toward the patella), never the image "
    "axes. Femoral cartilage after pymskt / Eckstein-Wirth: medial | lateral at the intercondylar notch; "
    "anterior (trochlea) in front of the trochlear notch; weight-bearing from the notch over "
    f"{WEIGHT_BEARING_FRACTION:g} of the distance to the condyle's most posterior cartilage; posterior "
    "behind. Tibial cartilage: anterior / central / posterior thirds of each plateau's anterior-posterior "
    "extent. Patellar cartilage: medial | lateral facet at its centre of mass"
)

_FEMUR = BY_NAME["femur"].label
_TIBIA = BY_NAME["tibia"].label
_PATELLA = BY_NAME["patella"].label
_FEMORAL = BY_NAME["femoral_cartilage"].label
_MEDIAL_TIBIAL = BY_NAME["medial_tibial_cartilage"].label
_LATERAL_TIBIAL = BY_NAME["lateral_tibial_cartilage"].label
_PATELLAR = BY_NAME["patellar_cartilage"].label
_MEDIAL_MENISCUS = BY_NAME["medial_meniscus"].label
_LATERAL_MENISCUS = BY_NAME["lateral_meniscus"].label


class NoFrame(ValueError):
    """The segmentation lacks what the frame is built from; the message says what (no patient data)."""


@dataclass(frozen=True)
class KneeFrame:
    """The knee's anatomical axes in the voxel grid's millimetre space (index × spacing).

    ``axes`` rows are the unit vectors medial, anterior, superior; ``origin_mm`` is the femoral shaft
    centroid. :meth:`coordinates` gives voxel centres in (m, a, u) mm.
    """

    origin_mm: NDArray[np.float64]
    axes: NDArray[np.float64]
    spacing: NDArray[np.float64]

    def __post_init__(self) -> None:
        if self.axes.shape != (3, 3) or not np.allclose(self.axes @ self.axes.T, np.eye(3), atol=1e-6):
            raise ValueError("frame axes must be three orthonormal rows")

    def coordinates(self, voxels: NDArray[np.integer[Any]]) -> NDArray[np.float64]:
        """(m, a, u) in mm of the centres of *voxels* (an (n, 3) index array)."""
        return (voxels * self.spacing - self.origin_mm) @ self.axes.T


def _sampled(
    labels: NDArray[Any], box: tuple[slice, ...] | None, step: NDArray[Any]
) -> tuple[NDArray[Any], NDArray[np.int64]]:
    """The view of *labels* inside *box* sampled every *step* voxels, and the index of its first voxel."""
    if box is None:
        box = tuple(slice(0, n) for n in labels.shape)
    sub = tuple(slice(b.start, b.stop, int(s)) for b, s in zip(box, step, strict=True))
    return labels[sub], np.array([b.start for b in box])


def _points(labels: NDArray[Any], values: Sequence[int], box: tuple[slice, ...] | None, step: NDArray[Any]):
    """Voxel indices (n, 3) of *values* inside *box*, sampled every *step* voxels."""
    view, origin = _sampled(labels, box, step)
    mask = view == values[0]
    for v in values[1:]:
        mask |= view == v
    return np.argwhere(mask) * step + origin


def _bone_points(labels: NDArray[Any], value: int, box: tuple[slice, ...] | None, step: NDArray[Any]):
    """Like :func:`_points` for one bone, but only its largest piece (26-connected on the sampled grid): a
    model's stray piece of a bone label (muscle at the edge of the field of view called tibia, seen at 22 %
    of the tibia's size on a full-size oblique knee) must not tilt the frame's axes."""
    import cc3d

    view, origin = _sampled(labels, box, step)
    mask = np.ascontiguousarray(view == value)
    pieces, count = cc3d.connected_components(mask, connectivity=26, return_N=True)
    if count > 1:
        sizes = np.bincount(pieces.ravel(), minlength=count + 1)
        sizes[0] = 0
        mask = pieces == int(np.argmax(sizes))
    return np.argwhere(mask) * step + origin


def _union_box(boxes: Sequence[tuple[slice, ...] | None]) -> tuple[slice, ...] | None:
    present = [b for b in boxes if b is not None]
    if not present:
        return None
    return tuple(slice(min(b[a].start for b in present), max(b[a].stop for b in present)) for a in range(3))


def _box(boxes: Sequence[tuple[slice, ...] | None], label: int) -> tuple[slice, ...] | None:
    return boxes[label - 1] if label - 1 < len(boxes) else None


def _band(points_mm: NDArray[np.float64], along: NDArray[np.float64], lo: float, hi: float):
    """Centroid of the points whose position *along* an axis lies between fractions *lo* and *hi* of its range."""
    a0, a1 = along.min(), along.max()
    sel = (along >= a0 + lo * (a1 - a0)) & (along <= a0 + hi * (a1 - a0))
    return points_mm[sel].mean(axis=0)


def knee_frame(
    labels: NDArray[Any], spacing: Sequence[float], boxes: Sequence[tuple[slice, ...] | None] | None = None
) -> KneeFrame:
    """The anatomical frame of the knee in *labels* (module docstring); ``NoFrame`` says what is missing.

    *boxes* are the labels' bounding boxes (``scipy.ndimage.find_objects``) if the caller has them.
    """
    from scipy import ndimage as ndi

    sp = np.asarray(spacing, dtype=np.float64)
    if boxes is None:
        boxes = ndi.find_objects(np.asarray(labels, dtype=np.uint8))
    step = np.maximum(1, np.round(_BONE_STEP_MM / sp)).astype(np.int64)
    femur = _bone_points(labels, _FEMUR, _box(boxes, _FEMUR), step) * sp
    if len(femur) < 10:
        raise NoFrame("no femur segmented: the subregions need the femur for the knee's anatomical frame")
    tibia = _bone_points(labels, _TIBIA, _box(boxes, _TIBIA), step) * sp
    if len(tibia) < 10:
        raise NoFrame("no tibia segmented: the subregions need the tibia for the knee's anatomical frame")
    one = np.ones(3, dtype=np.int64)
    # The plateau cartilage; the menisci only where it is missing (their C and O shapes shift their centroids).
    medial = _points(labels, [_MEDIAL_TIBIAL], _box(boxes, _MEDIAL_TIBIAL), one)
    if len(medial) == 0:
        medial = _points(labels, [_MEDIAL_MENISCUS], _box(boxes, _MEDIAL_MENISCUS), one)
    lateral = _points(labels, [_LATERAL_TIBIAL], _box(boxes, _LATERAL_TIBIAL), one)
    if len(lateral) == 0:
        lateral = _points(labels, [_LATERAL_MENISCUS], _box(boxes, _LATERAL_MENISCUS), one)
    if len(medial) == 0 or len(lateral) == 0:
        raise NoFrame(
            "medial or lateral tibial cartilage and meniscus not segmented: medial and lateral are unknown"
        )

    superior = femur.mean(axis=0) - tibia.mean(axis=0)
    for _ in range(3):
        superior /= np.linalg.norm(superior)
        along = tibia @ superior
        if along.max() - along.min() >= _MIN_TIBIAL_SHAFT_MM:
            # The tibial shaft: centroids of two bands of the tibia below the plateau.
            superior = _band(tibia, along, 0.3, 0.6) - _band(tibia, along, 0.0, 0.3)
        else:
            # Too little tibia in view: the line from the tibia's distal part to the femur's proximal part.
            superior = _band(femur, femur @ superior, 0.7, 1.0) - _band(tibia, along, 0.0, 0.3)
    superior /= np.linalg.norm(superior)
    top = _band(femur, femur @ superior, 1.0 - _SHAFT_FRACTION, 1.0)
    side = (medial * sp).mean(axis=0) - (lateral * sp).mean(axis=0)
    side -= (side @ superior) * superior
    if np.linalg.norm(side) < 1e-6:
        raise NoFrame("the medial and lateral compartments do not lie side by side")
    # The proximal tibia is wider than deep: the major axis of its cross-section is medial-lateral.
    along = tibia @ superior
    proximal = tibia[along >= along.min() + 0.5 * (along.max() - along.min())]
    flat = proximal - proximal.mean(axis=0)
    flat -= np.outer(flat @ superior, superior)
    _, vectors = np.linalg.eigh(flat.T @ flat)
    ml = vectors[:, -1] - (vectors[:, -1] @ superior) * superior
    if np.linalg.norm(ml) < 1e-6:  # a degenerate tibia (a sliver): the compartments' direction instead
        ml = side
    ml /= np.linalg.norm(ml)
    if ml @ side < 0:
        ml = -ml
    anterior = np.cross(superior, ml)
    patella = _bone_points(labels, _PATELLA, _box(boxes, _PATELLA), step) * sp
    if len(patella) >= 10:
        flip = (patella.mean(axis=0) - top) @ anterior < 0
    else:
        # The posterior condyles reach farther behind the shaft than the trochlea in front of it.
        along = (femur - top) @ anterior
        distal = (femur - top) @ superior < np.quantile((femur - top) @ superior, 0.4)
        flip = -along[distal].min() < along[distal].max()
    if flip:
        anterior = -anterior
    return KneeFrame(origin_mm=top, axes=np.stack([ml, anterior, superior]), spacing=sp)


def _runs(empty: NDArray[np.bool_]) -> list[tuple[int, int]]:
    """Half-open index ranges of the runs of True in *empty*."""
    edges = np.diff(np.concatenate([[0], empty.astype(np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0], strict=True))


def _on_bone(labels: NDArray[np.uint8], box: tuple[slice, ...], tissue: int, bone: int) -> NDArray[np.bool_]:
    """For each *tissue* voxel in *box* (in :func:`_points`' order): whether its piece (26-connected) touches
    *bone* across a face. A model's pieces of cartilage away from the bone are not what the landmarks are."""
    import cc3d
    from scipy import ndimage as ndi

    grown = tuple(
        slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(box, labels.shape, strict=True)
    )
    inner = tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, grown, strict=True))
    near_bone = ndi.binary_dilation(labels[grown] == bone)[inner]
    mask = np.ascontiguousarray(labels[box] == tissue)
    pieces = cc3d.connected_components(mask, connectivity=26)
    touching = np.unique(pieces[near_bone & mask])
    return np.isin(pieces[mask], touching)


def _femoral(
    coords: NDArray[np.float64], bin_mm: float, reference: NDArray[np.bool_]
) -> tuple[NDArray[np.uint8], dict[str, float]]:
    """Femoral subregion labels of the cartilage voxels at *coords* (m, a, u), and the landmarks used; the
    landmarks come from the voxels marked in *reference* (the pieces on the femur)."""
    m, a = coords[:, 0], coords[:, 1]
    if reference.sum() >= 3:
        m_ref, a_ref = m[reference], a[reference]
    else:
        m_ref, a_ref = m, a
    # The notch: the gap between the condyles' cartilage behind the shaft axis, nearest the axis.
    behind = m_ref[(a_ref < 0) & (np.abs(m_ref) < _NOTCH_SEARCH_MM)]
    edges = np.arange(-_NOTCH_SEARCH_MM, _NOTCH_SEARCH_MM + bin_mm, bin_mm)
    counts, _ = np.histogram(behind, bins=edges)
    centres = 0.5 * (edges[:-1] + edges[1:])
    # A gap bin holds under NOTCH_GAP_FRACTION of the condyles' count: a model's stray voxels in the notch
    # leave a sixth of it there (an empty-bin rule found no gap, and the notch landed on a condyle).
    empty = counts <= _NOTCH_GAP_FRACTION * max(1.0, float(np.percentile(counts, 90)))
    runs = [r for r in _runs(empty) if r[0] > 0 and r[1] < len(counts)]  # a gap between two condyles
    if len(behind) == 0:
        m_notch, half = 0.0, bin_mm  # no condyles behind the shaft: the shaft axis
    elif runs:
        lo, hi = min(runs, key=lambda r: abs(0.5 * (centres[r[0]] + centres[r[1] - 1])))
        m_notch = 0.5 * (centres[lo] + centres[hi - 1])
        half = max(0.5 * (hi - lo - 2) * bin_mm, 0.5 * bin_mm)
    else:
        m_notch = float(centres[np.argmin(counts)]) if len(counts) else 0.0
        half = bin_mm
    in_notch = np.abs(m_ref - m_notch) <= half
    # the trochlear notch: the posterior end of the trochlea's cartilage in the notch columns, in front of the
    # shaft axis (stray voxels behind, between the condyles, are not trochlea)
    trochlear = in_notch & (a_ref > 0)
    if trochlear.sum() < 3:
        trochlear = in_notch
    a_notch = float(np.percentile(a_ref[trochlear], 2)) if trochlear.sum() >= 3 else 0.0
    medial_ref = m_ref > m_notch
    a_post = {
        side: float(np.percentile(a_ref[mask], 0.5)) if mask.any() else a_notch
        for side, mask in (("medial", medial_ref), ("lateral", ~medial_ref))
    }
    medial = m > m_notch
    boundary = np.where(
        medial,
        a_notch + WEIGHT_BEARING_FRACTION * (a_post["medial"] - a_notch),
        a_notch + WEIGHT_BEARING_FRACTION * (a_post["lateral"] - a_notch),
    )
    out = np.where(
        a > a_notch,
        _label("femoral_anterior"),
        np.where(
            a >= boundary,
            np.where(medial, _label("femoral_medial_central"), _label("femoral_lateral_central")),
            np.where(medial, _label("femoral_medial_posterior"), _label("femoral_lateral_posterior")),
        ),
    ).astype(np.uint8)
    landmarks = {
        "notch_ml_mm": float(m_notch),
        "trochlear_notch_ap_mm": a_notch,
        "medial_posterior_end_ap_mm": a_post["medial"],
        "lateral_posterior_end_ap_mm": a_post["lateral"],
    }
    return out, landmarks


def _label(name: str) -> int:
    return REGIONS_BY_NAME[name].label


def _thirds(a: NDArray[np.float64], names: tuple[str, str, str]) -> NDArray[np.uint8]:
    """Anterior / central / posterior thirds of the extent of *a* (names in that order)."""
    lo, hi = np.percentile(a, _EXTENT_PERCENTILES)
    third = (hi - lo) / 3.0
    return np.where(
        a > hi - third, _label(names[0]), np.where(a >= lo + third, _label(names[1]), _label(names[2]))
    ).astype(np.uint8)


def assign_regions(
    labels: NDArray[Any],
    spacing: Sequence[float],
    boxes: Sequence[tuple[slice, ...] | None] | None = None,
) -> tuple[NDArray[np.uint8], dict[str, Any]]:
    """The subregion label map of *labels* (same shape, 0 outside cartilage) and a description of the frame.

    Raises :class:`NoFrame` when the bones the frame needs are missing. The description holds the frame's axes
    in the grid's mm space and the femoral landmarks (mm in the frame), for report.json.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    small = labels if labels.dtype == np.uint8 else labels.astype(np.uint8)
    if boxes is None:
        boxes = ndi.find_objects(small)
    frame = knee_frame(small, spacing, boxes)
    out = np.zeros_like(small)  # the labels' layout: the SEG's frames and the NIfTI read it without a copy
    bin_mm = 1.01 * float(max(frame.spacing))  # every bin holds a voxel centre along any direction
    info: dict[str, Any] = {
        "voxels": {},  # voxels per region label
        "axes": {
            name: [round(float(v), 6) for v in row]
            for name, row in zip(("medial", "anterior", "superior"), frame.axes, strict=True)
        },
    }
    one = np.ones(3, dtype=np.int64)
    for tissue in (_FEMORAL, _MEDIAL_TIBIAL, _LATERAL_TIBIAL, _PATELLAR):
        box = _box(boxes, tissue)
        if box is None:
            continue
        voxels = _points(small, [tissue], box, one)
        if len(voxels) == 0:
            continue
        coords = frame.coordinates(voxels)
        if tissue == _FEMORAL:
            values, landmarks = _femoral(coords, bin_mm, _on_bone(small, box, _FEMORAL, _FEMUR))
            info["femoral_landmarks_mm"] = {k: round(v, 3) for k, v in landmarks.items()}
        elif tissue == _MEDIAL_TIBIAL:
            values = _thirds(
                coords[:, 1], ("medial_tibial_anterior", "medial_tibial_central", "medial_tibial_posterior")
            )
        elif tissue == _LATERAL_TIBIAL:
            values = _thirds(
                coords[:, 1],
                ("lateral_tibial_anterior", "lateral_tibial_central", "lateral_tibial_posterior"),
            )
        else:
            centre = coords[:, 0].mean()
            values = np.where(
                coords[:, 0] > centre, _label("patellar_medial"), _label("patellar_lateral")
            ).astype(np.uint8)
        out[tuple(voxels.T)] = values
        counts = np.bincount(values, minlength=256)
        for label in np.nonzero(counts)[0]:
            info["voxels"][int(label)] = int(counts[label])
    return out, info
