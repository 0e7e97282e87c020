"""Knee measurements from a label map: tissue volumes and cartilage thickness.

Volumes are voxel counts × voxel volume: exact for the label map, and the same numbers the phantom truth uses.

Cartilage thickness is measured along the normal of the bone surface the cartilage covers, which is how the
sheet's thickness is defined (and how the phantom builds it):

1. Interface faces: every voxel face between the covered bone and the cartilage (the bone–cartilage interface,
   "BCI"). Each gets the outward normal of the bone surface, from the gradient of the bone mask smoothed with
   a Gaussian of ``max(1 mm, largest voxel spacing)``, and stands for its area projected onto the surface
   (face area × cosine to the normal): the projections of a voxel staircase tile the surface it approximates,
   so weighted statistics are per unit of surface area, not per staircase step.
2. A ray from a uniformly random point of each face (fixed seed) along its normal; the thickness is the
   integral along the ray of the trilinearly interpolated cartilage mask over the first run of cartilage it
   meets. For rays spread evenly over the surface this integral averages to the cartilage volume per unit
   area, i.e. the thickness, without bias whatever the tilt of the sheet to the grid: no thresholding, no
   counting of voxels. (Rays lined up with the grid, from voxel centres, are biased by up to -8 % on tilted
   sheets; the random start points remove that.)
3. Faces nearer to the edge of the cartilage-covered bone area (or to the image border) than the sheet's
   median raw thickness are left out: there the ray leaves through the sheet's cut edge, not its articular
   surface, and would measure the edge instead of the sheet.
4. The per-face thicknesses are smoothed over the interface with a Gaussian of ``max(1.5 mm, 1.5 × largest
   voxel spacing)`` (area-weighted normalised convolution): a slightly tilted sheet holds a whole number of
   voxels across on long terraces, so single rays are quantised to the voxel size while the surface average
   is not; the smoothing takes that quantisation out of the median, spread and 95th percentile. Where the
   Gaussian spans several voxels it is computed on a grid coarsened by whole factors, with the same effective
   width (``_smooth_over_interface``; within 0.001 mm of the voxel-grid result on the full-size phantoms).

Mean, median, standard deviation and 95th percentile are area-weighted over the kept faces. The number of
voxels across the sheet along the normal (``voxels_across``, median) says how well the grid resolves it: at
about 1.2 or less the sheet is no thicker than a voxel along its normal, only its volume is reliable and its
local thickness is not (tests/test_analysis.py gives the errors on both phantom sizes).

Cartilage subregions (:mod:`worker.subregions`: an anatomical frame from the bones, the pymskt /
Eckstein-Wirth femoral scheme, tibial thirds, patellar facets) are measured from the same per-face values: each
interface face belongs to the subregion of the cartilage voxel across it, and a subregion's statistics are
those of its measured faces, after the smoothing over the whole sheet (the rays are not cast again). Its
volume is its voxel count × voxel volume; a subregion that cannot be measured (no frame, no cartilage, fewer
than ``MIN_REGION_FACES`` measured faces, a sheet under ``MIN_VOXELS_ACROSS`` voxels across) has null values
and the reason (:func:`_region_entries`). The subregions add about 0.1 s to a full-size knee.

The work is done per cartilage on a box cropped around it (margin: the Gaussian filter widths), with
SciPy's ``ndimage`` (Gaussian filter, map_coordinates) and a k-d tree for the edge distances; the interface
is found from the list of cartilage voxels, not by scanning the box. A full-size knee (384 × 384 × 160) takes
about 1.0–1.2 s on one core of the development machine (bench/analysis.py), about 1.1 s on the demo model's
output for it, whose stray cartilage voxels widen the boxes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from openmsk.labels import TISSUES, Tissue
from openmsk.regions import MEASURED, NOT_MEASURABLE, REGIONS
from worker.subregions import REGION_METHOD, WEIGHT_BEARING_FRACTION, NoFrame, assign_regions

__all__ = [
    "THICKNESS_METHOD",
    "UNITS",
    "VOLUME_METHOD",
    "FaceThickness",
    "KneeAnalysis",
    "analyse",
    "analyse_knee",
    "analyse_with_regions",
    "cartilage_thickness",
    "face_thickness",
    "thickness_statistics",
]

UNITS = {"volume": "mm3", "thickness": "mm"}
VOLUME_METHOD = "voxel count × voxel volume (product of the voxel spacings)"
THICKNESS_METHOD = (
    "thickness along the bone-surface normal: from a random point of each voxel face between bone and "
    "cartilage, the integral of the trilinearly interpolated cartilage mask along the outward normal of the "
    "bone surface (gradient of the Gaussian-smoothed bone mask), each face weighted by its area projected on "
    "the surface; faces closer to the edge of the covered bone area than the median thickness left out; "
    "values smoothed over the interface (normalised Gaussian); area-weighted mean, median, standard "
    "deviation and 95th percentile"
)

# Rays stop here: thicker than any articular cartilage (patellar cartilage reaches about 7 mm).
MAX_THICKNESS_MM = 10.0
# Rays are traced this far first (mm); only rays still in cartilage there go on to MAX_THICKNESS_MM.
_FIRST_PASS_MM = 5.0
# Rays start this many of the largest voxel spacings inside the bone, so that the interpolated mask is still
# zero where they begin.
_RAY_START_VOXELS = 1.5
# Ray sample step as a fraction of the smallest spacing: half a voxel changes no thickness by more than 0.3 %
# from a quarter (measured on the phantoms); the random ray starts average the sampling error out.
_RAY_STEP_FRACTION = 0.5
# Seed of the ray start jitter (any fixed number: it only makes the result repeatable).
_JITTER_SEED = 20_240_917
# Gaussian kernels end at this many sigmas (scipy's default of 4 costs a third more for no visible change).
_TRUNCATE = 3.0
# Points traced per batch: bounds the memory of the ray samples (about 50 MB per batch).
_RAY_BATCH = 8192
# Leave at least this fraction of the interface points even where the edge exclusion would take more (very
# thin or fragmented sheets), so that a measurement is always reported.
_MIN_KEPT_FRACTION = 0.2


def normal_sigma_mm(spacing: Sequence[float]) -> float:
    """Gaussian width for the bone-surface normals: at least a millimetre, at least one voxel."""
    return max(1.0, float(max(spacing)))


def smoothing_sigma_mm(spacing: Sequence[float]) -> float:
    """Gaussian width for smoothing thickness over the interface: 1.5 mm or 1.5 voxels, the larger."""
    return max(1.5, 1.5 * float(max(spacing)))


def _check_inputs(labels: NDArray[Any], spacing: Sequence[float]) -> tuple[NDArray[Any], NDArray[np.float64]]:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D array (i, j, k), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be three positive numbers (mm along i, j, k), got {spacing!r}")
    return labels, sp


def _touching(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Voxels in *mask* or sharing a face with it: a 6-connected dilation by one voxel, by slicing."""
    out = mask.copy()
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        out[tuple(lo)] |= mask[tuple(hi)]
        out[tuple(hi)] |= mask[tuple(lo)]
    return out


def _crop(
    mask_slices: tuple[slice, ...], shape: tuple[int, ...], margin: NDArray[np.int64]
) -> tuple[slice, ...]:
    return tuple(
        slice(max(0, s.start - int(m)), min(n, s.stop + int(m)))
        for s, m, n in zip(mask_slices, margin, shape, strict=True)
    )


def cartilage_thickness(
    labels: NDArray[Any],
    spacing: Sequence[float],
    cartilage: int,
    bone: int,
    *,
    box: tuple[slice, ...] | None = None,
) -> dict[str, Any] | None:
    """Thickness statistics (mm) of label *cartilage* measured from the surface of label *bone*.

    Returns ``None`` when the cartilage does not touch the bone anywhere (nothing to measure from); otherwise
    a dict with ``mean``, ``median``, ``std``, ``p95`` (mm, area-weighted), ``samples`` (interface faces
    used), ``interface_area_mm2`` (area of the bone–cartilage interface) and ``voxels_across`` (median sheet
    thickness in voxels along the normal). *box* is the cartilage's bounding box if the caller has it
    (``scipy.ndimage.find_objects``), to save a pass.

    The per-face values behind it come from :func:`face_thickness`; :func:`thickness_statistics` summarises
    them, for the whole sheet as here or for a subregion of it.
    """
    faces = face_thickness(labels, spacing, cartilage, bone, box=box)
    return None if faces is None else thickness_statistics(faces)


class FaceThickness(NamedTuple):
    """The thickness of one cartilage sheet face by face, before it is summarised.

    One entry per bone–cartilage interface face: the cartilage voxel across it (full-grid index, to split the
    faces by subregion), its area projected onto the bone surface and whether it is measured (away from the
    sheet's edge); ``thickness`` and ``extent`` (the voxel size along the normal, mm) for the measured faces
    only, in the same order.
    """

    cartilage_voxels: NDArray[np.int64]
    weight: NDArray[np.float64]
    kept: NDArray[np.bool_]
    thickness: NDArray[np.float64]
    extent: NDArray[np.float64]


def face_thickness(
    labels: NDArray[Any],
    spacing: Sequence[float],
    cartilage: int,
    bone: int,
    *,
    box: tuple[slice, ...] | None = None,
) -> FaceThickness | None:
    """The per-face thickness of label *cartilage* over label *bone* (None if it does not touch the bone).

    The steps: the region a ray from the bone can reach (:func:`_reachable_region`), the bone–cartilage
    interface faces with their normals and areas (:func:`_interface`), one ray per face (:func:`_cast_rays`),
    the faces away from the sheet's edge (:func:`_interior_faces`), and the thickness smoothed over the
    interface (:func:`_smooth_over_interface`). Smoothing the whole sheet once and splitting afterwards
    gives a subregion the same values near its boundary as the sheet has there.
    """
    from scipy import ndimage as ndi

    labels, sp = _check_inputs(labels, spacing)
    if box is None:
        found = ndi.find_objects((labels == cartilage).view(np.uint8))
        if not found or found[0] is None:
            return None
        box = found[0]
    region = _reachable_region(labels, sp, cartilage, bone, box)
    if region is None:
        return None
    crop, cart, bone_mask, cart_voxels = region
    faces = _interface(bone_mask, cart_voxels, sp)
    if faces is None:
        return None
    raw = _cast_rays(cart, faces, sp)
    keep = _interior_faces(labels.shape, crop, bone_mask, cart, faces, raw, sp)
    thickness = _smooth_over_interface(
        faces.bone_voxels[keep], raw[keep], faces.weight[keep], cart.shape, sp, smoothing_sigma_mm(sp)
    )
    # Voxel extent along each normal: 1 / |n / spacing| (equals the spacing for a normal along an axis).
    extent = 1.0 / np.linalg.norm(faces.normal_mm[keep] / sp, axis=1)
    across = faces.bone_voxels.copy()
    rows = np.arange(len(across))
    across[rows, faces.face_axis] += faces.face_side
    across += np.array([c.start for c in crop])
    return FaceThickness(across, faces.weight, keep, thickness, extent)


def thickness_statistics(
    faces: FaceThickness, select: NDArray[np.bool_] | None = None
) -> dict[str, Any] | None:
    """Area-weighted statistics of the measured faces among *select* (a mask over all faces; all if None).

    The dict of :func:`cartilage_thickness`; None when no measured face is selected.
    """
    chosen = faces.kept if select is None else faces.kept & select
    if not chosen.any():
        return None
    among_kept = chosen[faces.kept]
    thickness = faces.thickness[among_kept]
    w = faces.weight[chosen]
    mean = float(np.average(thickness, weights=w))
    area = faces.weight.sum() if select is None else faces.weight[select].sum()
    return {
        "mean": mean,
        "median": _weighted_quantile(thickness, w, 0.5),
        "std": float(np.sqrt(np.average((thickness - mean) ** 2, weights=w))),
        "p95": _weighted_quantile(thickness, w, 0.95),
        "samples": int(chosen.sum()),
        "interface_area_mm2": float(area),
        "voxels_across": _weighted_quantile(thickness / faces.extent[among_kept], w, 0.5),
    }


class _Faces(NamedTuple):
    """The bone–cartilage interface: one entry per voxel face between a bone and a cartilage voxel."""

    bone_voxels: NDArray[np.int64]  # (n, 3) the bone voxel of each face, in the crop
    face_axis: NDArray[np.int64]  # the axis the face is normal to
    face_side: NDArray[np.int64]  # +1 / -1: on which side of the bone voxel the cartilage is
    normal_mm: NDArray[np.float64]  # (n, 3) outward bone normal, unit length in mm space
    weight: NDArray[np.float64]  # the face's area projected onto the bone surface (mm²)


def _reachable_region(
    labels: NDArray[Any], sp: NDArray[np.float64], cartilage: int, bone: int, box: tuple[slice, ...]
) -> tuple[tuple[slice, ...], NDArray[np.bool_], NDArray[np.bool_], NDArray[np.int64]] | None:
    """The crop to measure in (the cartilage within a ray's reach of the bone, with room for the Gaussians),
    its cartilage and bone masks and its cartilage voxels; None if no cartilage voxel touches the bone."""
    sigma_n = normal_sigma_mm(sp)
    sigma_s = smoothing_sigma_mm(sp)
    # The crop needs room for the Gaussians only: rays that leave it sample zero there (mode="constant"),
    # which is right, as no cartilage a ray can reach lies outside the box ``near`` below.
    margin = np.ceil(_TRUNCATE * max(sigma_n, sigma_s) / sp).astype(np.int64) + 2
    # Only cartilage within a ray's reach of the bone can be measured: a stray speck of a segmentation far
    # from the bone would otherwise stretch the box (measured: a 3-voxel speck doubled the analysis time).
    grown = _crop(box, labels.shape, np.ones(3, dtype=np.int64))  # the bone under the sheet lies outside box
    around = labels[grown]
    in_box = np.argwhere(around == cartilage)
    seated = in_box[_next_to(around == bone, in_box)]
    if len(seated) == 0:
        return None
    reach = np.ceil((MAX_THICKNESS_MM + _RAY_START_VOXELS * sp.max()) / sp).astype(np.int64) + 1
    first = seated.min(axis=0) + [g.start for g in grown] - reach
    last = seated.max(axis=0) + [g.start for g in grown] + reach
    near = tuple(
        slice(max(b.start, int(lo)), min(b.stop, int(hi) + 1))
        for b, lo, hi in zip(box, first, last, strict=True)
    )
    crop = _crop(near, labels.shape, margin)
    sub = labels[crop]
    cart = sub == cartilage
    bone_mask = sub == bone

    # The crop's cartilage voxels are those of the box found above that lie in it (still in row-major order).
    cart_voxels = in_box + [g.start - c.start for g, c in zip(grown, crop, strict=True)]
    cart_voxels = cart_voxels[np.all((cart_voxels >= 0) & (cart_voxels < cart.shape), axis=1)]
    return crop, cart, bone_mask, cart_voxels


def _interface(
    bone_mask: NDArray[np.bool_], cart_voxels: NDArray[np.int64], sp: NDArray[np.float64]
) -> _Faces | None:
    """The interface faces that stand for some bone surface, with normals and areas; None if there are none."""
    bone_voxels, face_axis, face_side = _interface_faces(bone_mask, cart_voxels)
    if len(bone_voxels) == 0:
        return None
    normal_mm, norm = _bone_normals(bone_mask, bone_voxels, sp)
    # Each face stands for its area projected onto the bone surface (face area × cosine to the normal): these
    # projections tile the surface, so weighted means are means per surface area, not per staircase step.
    face_area = np.prod(sp) / sp[face_axis]
    cosine = face_side * normal_mm[np.arange(len(face_axis)), face_axis]
    weight = face_area * cosine
    ok = (norm > 1e-6) & (cosine > 0.05)  # faces turned away from the normal stand for no area
    if not ok.any():
        return None
    return _Faces(bone_voxels[ok], face_axis[ok], face_side[ok], normal_mm[ok], weight[ok])


def _bone_normals(
    bone_mask: NDArray[np.bool_], bone_voxels: NDArray[np.int64], sp: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Outward bone normal (mm space, unit length) at each of *bone_voxels*, and the gradient's length.

    From central differences of the smoothed bone mask (one-sided at the border of the image, where the crop
    cannot add a margin). The smoothing is needed around the interface only: its box, with room for the
    kernel and the differences.
    """
    from scipy import ndimage as ndi

    sigma_n = normal_sigma_mm(sp)
    room = np.ceil(_TRUNCATE * sigma_n / sp).astype(np.int64) + 2
    low = np.maximum(bone_voxels.min(axis=0) - room, 0)
    high = np.minimum(bone_voxels.max(axis=0) + room + 1, bone_mask.shape)
    smooth_bone = ndi.gaussian_filter(
        bone_mask[tuple(slice(a, b) for a, b in zip(low, high, strict=True))].astype(np.float32),
        sigma=sigma_n / sp,
        mode="nearest",
        truncate=_TRUNCATE,
    )
    local = bone_voxels - low
    grad = np.empty(bone_voxels.shape, dtype=np.float64)
    for axis in range(3):
        ahead = local.copy()
        behind = local.copy()
        ahead[:, axis] = np.minimum(local[:, axis] + 1, smooth_bone.shape[axis] - 1)
        behind[:, axis] = np.maximum(local[:, axis] - 1, 0)
        dist = (ahead[:, axis] - behind[:, axis]) * sp[axis]
        grad[:, axis] = (smooth_bone[tuple(ahead.T)] - smooth_bone[tuple(behind.T)]) / np.maximum(dist, 1e-9)
    norm = np.linalg.norm(grad, axis=1)
    return -grad / np.maximum(norm, 1e-12)[:, None], norm


def _cast_rays(cart: NDArray[np.bool_], faces: _Faces, sp: NDArray[np.float64]) -> NDArray[np.float64]:
    """The cartilage thickness (mm) along one ray per face, from the face along the bone normal.

    Rays start at a uniformly random point of their face (fixed seed: the same labels give the same numbers),
    so that the rays are spread evenly across the surface instead of lined up with the voxel grid, which
    would bias the integral on tilted sheets.
    """
    bone_voxels, face_axis, face_side = faces.bone_voxels, faces.face_axis, faces.face_side
    rng = np.random.default_rng(_JITTER_SEED)
    starts = bone_voxels.astype(np.float64) + rng.uniform(-0.5, 0.5, size=bone_voxels.shape)
    rows = np.arange(len(face_axis))
    starts[rows, face_axis] = bone_voxels[rows, face_axis] + 0.5 * face_side
    return _trace(cart, starts, faces.normal_mm, sp)


def _interior_faces(
    shape: tuple[int, ...],
    crop: tuple[slice, ...],
    bone_mask: NDArray[np.bool_],
    cart: NDArray[np.bool_],
    faces: _Faces,
    raw: NDArray[np.float64],
    sp: NDArray[np.float64],
) -> NDArray[np.bool_]:
    """Which faces are measured: those farther from the edge of the sheet than its median thickness.

    The edge is the edge of the covered area (the nearest bare bone-surface voxel) or the border of the
    image, which cuts a sheet as its own edge does. A sheet too thin or fragmented for that band keeps the
    faces farthest from its edge instead.
    """
    bone_voxels, weight = faces.bone_voxels, faces.weight
    full_index = bone_voxels + np.array([s.start for s in crop])
    border_mm = (np.minimum(full_index, np.array(shape) - 1 - full_index) * sp).min(axis=1)
    edge_band = _weighted_quantile(raw, weight, 0.5)
    # Only "nearer than the band?" matters here, so the search stops at the band (most faces are farther),
    # and only the bare surface within the band of the faces' box can be that near.
    reach_band = np.ceil(edge_band * 1.001 / sp).astype(np.int64) + 1
    bare_points = _bare_surface(
        bone_mask, cart, bone_voxels.min(axis=0) - reach_band, bone_voxels.max(axis=0) + reach_band + 1
    )
    edge_mm = np.minimum(_edge_distance(bare_points * sp, bone_voxels * sp, edge_band * 1.001), border_mm)
    keep = edge_mm > edge_band
    if weight[keep].sum() < _MIN_KEPT_FRACTION * weight.sum():
        # Too thin or fragmented for an edge band: keep the faces farthest from the edge.
        bare_points = _bare_surface(bone_mask, cart, np.zeros(3, dtype=np.int64), np.array(cart.shape))
        edge_mm = np.minimum(_edge_distance(bare_points * sp, bone_voxels * sp, np.inf), border_mm)
        keep = edge_mm >= _weighted_quantile(edge_mm, weight, 1.0 - _MIN_KEPT_FRACTION)
    return keep


def _smooth_over_interface(
    points: NDArray[np.int64],
    values: NDArray[np.float64],
    weights: NDArray[np.float64],
    shape: tuple[int, ...],
    sp: NDArray[np.float64],
    sigma_mm: float,
) -> NDArray[np.float64]:
    """Weighted Gaussian average of *values* at each of *points* (voxel indices): normalised convolution.

    Along an axis where the Gaussian spans at least two cells of twice the voxel size, the sums are taken on
    a grid coarser by a whole factor: each point is spread onto it trilinearly, the grid is smoothed and each
    point reads it back trilinearly, with the Gaussian narrowed by the variance that spreading and reading
    add (t (1 - t) cells² each, t the point's offset in its cell), so the kernel keeps its width. On a
    full-size knee (0.36 mm pixels, 1.5 mm Gaussian) that grid has a quarter of the voxels; where no axis is
    coarsened the points sit on the grid and this is the plain normalised convolution.
    """
    from scipy import ndimage as ndi

    factor = np.maximum(1, np.floor(sigma_mm / (2.0 * sp))).astype(np.int64)
    # Voxel centre -> coarse grid coordinate, one cell of zeros before the first (the spreading reaches it).
    coords = (points + 0.5) / factor + 0.5
    base = np.floor(coords).astype(np.int64)
    offset = coords - base
    grid_shape = tuple(int(-(-n // f)) + 2 for n, f in zip(shape, factor, strict=True))
    corners = list(np.ndindex(2, 2, 2))
    cell = np.concatenate([np.ravel_multi_index(tuple((base + c).T), grid_shape) for c in corners])
    share = np.concatenate([np.prod(np.where(c, offset, 1.0 - offset), axis=1) for c in corners])
    size = int(np.prod(grid_shape))

    def spread(amount: NDArray[np.float64]) -> NDArray[np.float32]:
        sums = np.bincount(cell, weights=share * np.tile(amount, len(corners)), minlength=size)
        return sums.reshape(grid_shape).astype(np.float32)

    weighted = spread(weights * values)
    total = spread(weights)
    added = 2.0 * np.mean(offset * (1.0 - offset), axis=0)
    sigma_cells = np.sqrt(np.maximum((sigma_mm / (factor * sp)) ** 2 - added, 0.25))
    smoothed = [
        ndi.map_coordinates(
            ndi.gaussian_filter(grid, sigma=sigma_cells, mode="constant", truncate=_TRUNCATE),
            coords.T,
            order=1,
            mode="constant",
            prefilter=False,
        )
        for grid in (weighted, total)
    ]
    return smoothed[0].astype(np.float64) / smoothed[1]


def _bare_surface(
    bone: NDArray[np.bool_], cart: NDArray[np.bool_], low: NDArray[np.int64], high: NDArray[np.int64]
) -> NDArray[np.int64]:
    """Indices of the bone voxels in the box ``[low, high)`` that share a face with neither bone nor cartilage:
    the bare bone surface, whose nearest point marks the edge of the covered area.

    A gap enclosed by bone and cartilage (no path to the box's border but through them) is not bare: a model
    leaves such pinholes between the subchondral plate and the sheet (113 voxels under a full-size patella),
    and each one, counted as an edge, cut a disk of the median thickness out of the measured faces."""
    import cc3d

    low = np.maximum(low, 0)
    high = np.minimum(high, bone.shape)
    # one voxel more on each side, so that the faces at the box's border see their neighbours
    outer_low, outer_high = np.maximum(low - 1, 0), np.minimum(high + 1, bone.shape)
    outer = tuple(slice(a, b) for a, b in zip(outer_low, outer_high, strict=True))
    bone_box = bone[outer]
    other = ~(bone_box | cart[outer])
    pieces = cc3d.connected_components(other, connectivity=6)
    border = np.zeros(int(pieces.max()) + 1, dtype=bool)
    for axis in range(3):
        for end in (0, -1):
            border[np.take(pieces, end, axis=axis)] = True
    border[0] = False
    bare = bone_box & _touching(border[pieces])
    inner = tuple(slice(a, b) for a, b in zip(low - outer_low, high - outer_low, strict=True))
    return np.argwhere(bare[inner]) + low


def _edge_distance(
    bare_mm: NDArray[np.float64], points_mm: NDArray[np.float64], upper_bound: float
) -> NDArray[np.float64]:
    """Distance (mm) from each point to the nearest bare bone-surface point; ``inf`` beyond *upper_bound*."""
    from scipy.spatial import cKDTree

    if len(bare_mm) == 0:
        return np.full(len(points_mm), np.inf)
    distance, _ = cKDTree(bare_mm).query(points_mm, k=1, distance_upper_bound=upper_bound)
    return distance


def _across_faces(
    mask: NDArray[np.bool_], voxels: NDArray[np.int64]
) -> Iterator[tuple[int, int, NDArray[np.bool_]]]:
    """For each face direction (axis, then side -1, +1): which of *voxels* have their neighbour across it in
    *mask*.

    Works on the voxel list, not the whole array: the cartilage is a thin sheet in a large box.
    """
    for axis in range(3):
        for side in (-1, 1):
            there = voxels.copy()
            there[:, axis] += side
            hit = (there[:, axis] >= 0) & (there[:, axis] < mask.shape[axis])
            hit[hit] = mask[tuple(there[hit].T)]
            yield axis, side, hit


def _next_to(mask: NDArray[np.bool_], voxels: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Which of *voxels* share a face with a voxel of *mask*."""
    found = np.zeros(len(voxels), dtype=bool)
    for _axis, _side, hit in _across_faces(mask, voxels):
        found |= hit
    return found


def _interface_faces(
    bone: NDArray[np.bool_], cart_voxels: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Every face between a bone voxel and a cartilage voxel: (bone voxel index, axis, side ±1 towards it).

    *cart_voxels* in row-major order (``np.argwhere``); the faces come grouped by direction (axis, side
    +1 then -1), each group in row-major order of the bone voxel, as a scan of the arrays would give them.
    """
    voxels, axes, sides = [], [], []
    for axis, step, hit in _across_faces(bone, cart_voxels):
        # the bone voxel lies a step from the cartilage, so the cartilage lies the other way from the bone
        bone_voxels = cart_voxels[hit]
        bone_voxels[:, axis] += step
        voxels.append(bone_voxels)
        axes.append(np.full(len(bone_voxels), axis, dtype=np.int64))
        sides.append(np.full(len(bone_voxels), -step, dtype=np.int64))
    return np.concatenate(voxels), np.concatenate(axes), np.concatenate(sides)


def _weighted_quantile(values: NDArray[np.float64], weights: NDArray[np.float64], q: float) -> float:
    """The *q* quantile of *values* with *weights* (each weight centred on its value when summed)."""
    order = np.argsort(values)
    v = np.asarray(values, dtype=np.float64)[order]
    w = np.asarray(weights, dtype=np.float64)[order]
    cumulative = (np.cumsum(w) - 0.5 * w) / w.sum()
    return float(np.interp(q, cumulative, v))


def _trace(
    cart: NDArray[np.bool_],
    points: NDArray[np.float64],
    normal_mm: NDArray[np.float64],
    sp: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Length (mm) of the first cartilage run along each ray, as the integral of the interpolated mask.

    Rays are traced to :data:`_FIRST_PASS_MM` first and only those still in cartilage there to
    :data:`MAX_THICKNESS_MM`: nearly all cartilage is thinner, and the samples are most of the work.
    """
    length, open_ = _trace_to(cart, points, normal_mm, sp, _FIRST_PASS_MM)
    if open_.any():
        length[open_], _ = _trace_to(cart, points[open_], normal_mm[open_], sp, MAX_THICKNESS_MM)
    return length


def _trace_to(
    cart: NDArray[np.bool_],
    points: NDArray[np.float64],
    normal_mm: NDArray[np.float64],
    sp: NDArray[np.float64],
    reach_mm: float,
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Run lengths up to *reach_mm* along each ray, and whether the run was still open at the end."""
    from scipy import ndimage as ndi

    step_mm = _RAY_STEP_FRACTION * float(sp.min())
    s = np.arange(-_RAY_START_VOXELS * float(sp.max()), reach_mm, step_mm)
    field = cart.astype(np.float32)
    length = np.empty(len(points), dtype=np.float64)
    still_open = np.empty(len(points), dtype=bool)
    for start in range(0, len(points), _RAY_BATCH):
        batch = slice(start, start + _RAY_BATCH)
        p = np.asarray(points[batch], dtype=np.float64)
        d = normal_mm[batch] / sp  # voxel index per mm along the ray
        coords = p[:, None, :] + s[None, :, None] * d[:, None, :]
        samples = ndi.map_coordinates(
            field, coords.reshape(-1, 3).T, order=1, mode="constant", cval=0.0, prefilter=False
        ).reshape(len(p), len(s))
        inside = samples > 0.0
        # First run only: after the ray has met cartilage, the first zero sample ends it (the ray must not add
        # the next sheet it crosses, e.g. the tibial cartilage across the joint space).
        met = np.cumsum(inside, axis=1) > 0
        ended = np.cumsum(met & ~inside, axis=1) > 0
        length[batch] = np.where(met & ~ended, samples, 0.0).sum(axis=1) * step_mm
        still_open[batch] = inside[:, -1]
    return length, still_open


class KneeAnalysis(NamedTuple):
    """What :func:`analyse_knee` found: the measurements, the subregion map (None without a knee frame) and
    the per-face thickness of each measured cartilage sheet by label (what the thickness maps draw)."""

    measurements: dict[str, Any]
    region_map: NDArray[np.uint8] | None
    faces: dict[int, FaceThickness]


def analyse(labels: NDArray[Any], spacing: Sequence[float]) -> dict[str, Any]:
    """:func:`analyse_knee`'s measurements only."""
    return analyse_knee(labels, spacing).measurements


def analyse_with_regions(
    labels: NDArray[Any], spacing: Sequence[float]
) -> tuple[dict[str, Any], NDArray[np.uint8] | None]:
    """:func:`analyse_knee`'s measurements and subregion map."""
    found = analyse_knee(labels, spacing)
    return found.measurements, found.region_map


def analyse_knee(labels: NDArray[Any], spacing: Sequence[float]) -> KneeAnalysis:
    """Volumes of the tissues present in *labels* and thickness of the cartilage sheets among them.

    Parameters
    ----------
    labels: numpy.ndarray
        Integer label map in the canonical OpenMSK labels (:data:`openmsk.labels.TISSUES`), index (i, j, k).
    spacing: Sequence[float]
        Voxel spacing in mm along i, j and k.

    Returns
    -------
    KneeAnalysis
        The measurements, JSON-serialisable: ``units``, ``spacing_mm``, ``voxel_volume_mm3``, ``method``
        (the volume, thickness and subregion methods in words, with their parameters), ``tissues``, keyed by
        tissue name in label order, for the tissues present only: ``label``, ``display_name``, ``voxels``,
        ``volume_mm3`` and, for cartilage, ``thickness_mm`` (see :func:`cartilage_thickness`; ``None`` when
        the cartilage does not touch its bone) and ``interface_area_mm2``; and ``regions``, every subregion
        of :data:`openmsk.regions.REGIONS` by name (:func:`_region_entries`), with ``region_frame`` (the
        anatomical frame and landmarks). Labels that are not in the tissue table are counted under
        ``unknown_labels`` and otherwise ignored. Second, the subregion label map (uint8, the shape of
        *labels*), or None when the knee's frame could not be built (each region then says why). Third, the
        per-face thickness (:class:`FaceThickness`) of each cartilage sheet that touches its bone.
    """
    from scipy import ndimage as ndi

    labels, sp = _check_inputs(labels, spacing)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("labels must lie in 0..255")
    small = labels.astype(np.uint8, copy=False)
    voxel_mm3 = float(np.prod(sp))
    if small.flags.f_contiguous and not small.flags.c_contiguous:
        # find_objects is twice as slow across memory as along it: scan the C-ordered transpose of a
        # Fortran-ordered map (the pipeline's layout) and turn its boxes back.
        boxes = [None if b is None else b[::-1] for b in ndi.find_objects(small.T)]
    else:
        boxes = ndi.find_objects(small)
    # Counting inside each label's bounding box: a compare per box is several times cheaper than
    # np.bincount, which first widens the whole volume to 64-bit integers.
    counts = np.zeros(256, dtype=np.int64)
    for index, box in enumerate(boxes):
        if box is not None:
            counts[index + 1] = np.count_nonzero(small[box] == index + 1)

    tissues: dict[str, Any] = {}
    faces: dict[int, FaceThickness | None] = {}
    for value, tissue in TISSUES.items():
        n = int(counts[value])
        if n == 0:
            continue
        entry: dict[str, Any] = {
            "label": value,
            "display_name": tissue.display_name,
            "voxels": n,
            "volume_mm3": n * voxel_mm3,
        }
        if tissue.is_cartilage:
            faces[value] = _faces_or_none(small, sp, tissue, boxes[value - 1], counts)
            stats = None if faces[value] is None else thickness_statistics(faces[value])
            entry["thickness_mm"] = stats
            entry["interface_area_mm2"] = None if stats is None else stats["interface_area_mm2"]
        tissues[tissue.name] = entry
    unknown = {int(v): int(counts[v]) for v in np.nonzero(counts)[0] if v != 0 and v not in TISSUES}
    result: dict[str, Any] = {
        "units": dict(UNITS),
        "spacing_mm": [float(s) for s in sp],
        "voxel_volume_mm3": voxel_mm3,
        "method": {
            "volume": VOLUME_METHOD,
            "thickness": THICKNESS_METHOD,
            "thickness_parameters": {
                "normal_sigma_mm": normal_sigma_mm(sp),
                "smoothing_sigma_mm": smoothing_sigma_mm(sp),
                "max_thickness_mm": MAX_THICKNESS_MM,
                "edge_exclusion": "median raw thickness",
            },
        },
        "tissues": tissues,
    }
    result["method"]["regions"] = REGION_METHOD
    result["method"]["region_parameters"] = {
        "weight_bearing_fraction": WEIGHT_BEARING_FRACTION,
        "tibial_parts": 3,
        "min_faces": MIN_REGION_FACES,
        "min_voxels_across": MIN_VOXELS_ACROSS,
    }
    try:
        region_map, frame = assign_regions(small, sp, boxes)
    except NoFrame as exc:
        region_map, frame, why = None, None, str(exc)
    else:
        why = None
    result["regions"] = _region_entries(region_map, frame, why, faces, tissues, voxel_mm3)
    if frame is not None:
        result["region_frame"] = {k: v for k, v in frame.items() if k != "voxels"}
    if unknown:
        result["unknown_labels"] = unknown
    return KneeAnalysis(result, region_map, {k: v for k, v in faces.items() if v is not None})


#: A subregion's thickness needs at least this many measured interface faces.
MIN_REGION_FACES = 10
#: Below this many voxels across (median along the normal) a sheet's local thickness is not resolved.
MIN_VOXELS_ACROSS = 1.2


def _region_entries(
    region_map: NDArray[np.uint8] | None,
    frame: dict[str, Any] | None,
    why: str | None,
    faces: dict[int, FaceThickness | None],
    tissues: dict[str, Any],
    voxel_mm3: float,
) -> dict[str, Any]:
    """One measurement entry per subregion (the shape of :data:`openmsk.regions.MEASUREMENT_KEYS`).

    A value that could not be measured is None, with ``status`` "not measurable" and the ``reason``: no
    anatomical frame (*why*), no cartilage in the region, no bone interface, too few measured faces, or a
    sheet about one voxel thick (the volume is still given then: it is exact for the label map).
    """
    out: dict[str, Any] = {}
    region_of_face: dict[int, NDArray[np.uint8]] = {}
    for label, region in REGIONS.items():
        entry: dict[str, Any] = {
            "label": label,
            "display_name": region.display_name,
            "tissue": region.parent.name,
            "voxels": None,
            "volume_mm3": None,
            "thickness_mm": None,
            "interface_area_mm2": None,
            "status": NOT_MEASURABLE,
            "reason": None,
        }
        out[region.name] = entry
        if region_map is None or frame is None:
            entry["reason"] = why
            continue
        n = int(frame["voxels"].get(label, 0))
        if n == 0:
            entry["reason"] = (
                f"no {region.parent.display_name.lower()} segmented"
                if region.parent.name not in tissues
                else "no cartilage segmented in this subregion"
            )
            continue
        entry["voxels"] = n
        entry["volume_mm3"] = n * voxel_mm3
        sheet = faces.get(region.tissue)
        if sheet is None:
            entry["reason"] = "the cartilage does not touch its bone: no thickness"
            continue
        if region.tissue not in region_of_face:
            region_of_face[region.tissue] = region_map[tuple(sheet.cartilage_voxels.T)]
        select = region_of_face[region.tissue] == label
        entry["interface_area_mm2"] = float(sheet.weight[select].sum()) if select.any() else None
        stats = thickness_statistics(sheet, select)
        if stats is None or stats["samples"] < MIN_REGION_FACES:
            measured = 0 if stats is None else stats["samples"]
            entry["reason"] = (
                f"too small to measure thickness ({measured} interface faces away from its edge)"
            )
            continue
        if stats["voxels_across"] < MIN_VOXELS_ACROSS:
            entry["reason"] = (
                f"about one voxel thick along its normal ({stats['voxels_across']:.2f} voxels): "
                "thickness not resolved, volume only"
            )
            continue
        entry["thickness_mm"] = stats
        entry["status"] = MEASURED
    return out


def _faces_or_none(
    labels: NDArray[np.uint8],
    sp: NDArray[np.float64],
    tissue: Tissue,
    box: tuple[slice, ...] | None,
    counts: NDArray[np.int64],
) -> FaceThickness | None:
    assert tissue.bone is not None
    if box is None or counts[tissue.bone] == 0:
        return None
    return face_thickness(labels, sp, tissue.label, tissue.bone, box=box)
