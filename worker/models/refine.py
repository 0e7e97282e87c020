"""Refining a model's cartilage boundaries by the image's own intensities, at its native resolution.

A model that runs at a coarser spacing than the acquisition (the demo nnU-Nets run at 1.6 mm, full-size knees
are 0.36 x 0.36 x 0.7 mm) places each cartilage boundary to within about half of *its* voxel: on 2-3 mm thick
cartilage that is tens of percent of the thickness. :func:`refine_cartilage` moves those boundaries, in a
narrow band only, to where the image's intensity crosses halfway between cartilage and the tissue next to it
(the partial-volume midpoint, where a blurred edge is):

1. **Band.** Voxels within ``BAND_VOXELS`` face-step(s) of a cartilage label's boundary, on either side.
2. **Reference intensities, from the model's own labels in this image.** The cartilage level is the eroded
   interior of all cartilage labels, smoothed on a coarse grid (normalised convolution) so that a coil's
   bias field does not move the threshold; every band voxel is read as a ratio ``r`` to that local level.
   The neighbours' levels come from the voxels outside the model's cartilage in the band and a shell
   beyond: the 10th percentile of ``r`` over those
   clearly darker than cartilage (the purest dark neighbour: cortex, meniscus, fat, tendon; medians there
   read marrow and muscle beyond a thin cortex and removed 17 % of a true cartilage) and the 90th of those
   brighter (fluid), when there are enough.
3. **Decision.** A band voxel is cartilage when ``r`` lies between the midpoints of cartilage and its dark
   and bright neighbours: for two equal-variance classes that is where the likelihoods cross, and on a
   blurred edge it is the sub-voxel boundary. A voxel the model left out that is brighter than cartilage
   (``r > 1``) is only added where it lies between cartilage and clear fluid along an axis: a sub-voxel
   fluid film between cartilage and dark fat blurs to cartilage's level. The interior (cartilage beyond the
   band) is not touched in a pass; ``PASSES`` passes, each from the last one's boundary, let a boundary
   move up to two voxels.
4. **Clean-up.** Cartilage pieces (26-connected) that contain none of the untouched interior are dropped, so
   bright specks beside the band do not become cartilage. A voxel that becomes cartilage takes the label of
   the nearest cartilage (face neighbours, repeated); one that stops being cartilage takes, when darker than
   cartilage, a neighbouring non-cartilage label (bone, meniscus) and otherwise background.

The step knows nothing of phantoms: it needs a model that gets cartilage roughly right and an image in which
cartilage is brighter than bone's cortex (and darker than fluid, where fluid is seen), as in DESS, FLASH/
SPGR-FS or PD-FS knee MRI. With fewer than ``MIN_VOXELS`` interior or shell voxels it changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from openmsk.labels import BY_NAME

CARTILAGE_LABELS = tuple(
    BY_NAME[name].label
    for name in (
        "femoral_cartilage",
        "medial_tibial_cartilage",
        "lateral_tibial_cartilage",
        "patellar_cartilage",
    )
)
# cartilage is found as the labels' range in one compare (_is_cartilage)
assert tuple(range(min(CARTILAGE_LABELS), max(CARTILAGE_LABELS) + 1)) == CARTILAGE_LABELS, CARTILAGE_LABELS
BAND_VOXELS = 1  # face-steps either side of the model's boundary that may change (2: thin fluid films
# between femoral and tibial cartilage, barely brighter than cartilage, were absorbed: +11 % on true labels)
# Passes, each from the boundary the last one left: a boundary moves up to PASSES x BAND_VOXELS voxels (a
# model at 1.6 mm is off by up to about a native voxel or two on a knee thicker or thinner than it learnt; one
# pass left those 8-18 % thin or thick, a third pass gained nothing and eroded thin plateaus).
PASSES = 2
SHELL_VOXELS = 2  # width of the shell outside the band whose intensities describe the neighbours
BLOCK_MM = 4.0  # coarse grid of the local cartilage level
SMOOTH_BLOCKS = 1.5  # Gaussian sigma (blocks) of the local cartilage level
MIN_VOXELS = 200
NEIGHBOUR_PERCENTILE = 10  # the purest dark / bright neighbours: a low (high) percentile of the shell


def refine_cartilage(
    labels: NDArray[np.uint8], image: NDArray[Any], spacing: tuple[float, float, float]
) -> NDArray[np.uint8]:
    """Move the cartilage boundaries of *labels* to the intensity edges of *image*, in place (see module).

    *labels* and *image* are canonical ``(x, y, z)`` arrays of one shape (any memory layout); *spacing* in mm.
    Returns *labels*.
    """
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ in shape")
    # the cartilage's bounding box, from its projections on the axes
    mask = _is_cartilage(labels)
    if not mask.any():
        return labels
    margin = BAND_VOXELS + SHELL_VOXELS + 1
    box = []
    for axis, n in enumerate(labels.shape):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + 1 + margin)))
    box = tuple(box)
    lab = np.ascontiguousarray(labels[box])
    img = np.ascontiguousarray(image[box], dtype=np.float32)
    level: _LevelGrid | None = None  # the first pass's, read by the next: the model's interior sets the level
    for _ in range(PASSES):
        changed, level = _refine_box(lab, img, spacing, level)
        if changed is None:
            break
        lab = changed
    labels[box] = lab
    return labels


def _refine_box(
    lab: NDArray[np.uint8],
    img: NDArray[np.float32],
    spacing: tuple[float, float, float],
    level_grid: _LevelGrid | None,
) -> tuple[NDArray[np.uint8] | None, _LevelGrid | None]:
    """One pass over the box: the new labels (None: nothing to change) and the level grid it used."""
    cart = _is_cartilage(lab)
    interior = _eroded(cart, 1)
    core = interior if BAND_VOXELS == 1 else _eroded(interior, BAND_VOXELS - 1)
    grown = _dilated(cart, BAND_VOXELS)
    band = grown & ~core
    shell = _dilated(grown, SHELL_VOXELS) & ~grown
    if int(interior.sum()) < MIN_VOXELS or int(shell.sum()) < MIN_VOXELS:
        return None, level_grid

    # the cartilage level from its interior, robust to voxels the model got wrong (far from the median)
    if int(core.sum()) >= MIN_VOXELS:
        interior = core
    values = img[interior]
    median = float(np.median(values))
    if not median > 0:
        return None, level_grid
    trusted = interior & (img > 0.5 * median) & (img < 2.0 * median)
    where = band | shell
    points = np.nonzero(where)
    ratio = np.zeros(lab.shape, dtype=np.float32)
    if level_grid is None:
        level_grid = _level_grid(img, trusted, spacing)
    level = _read_level(level_grid, points)
    ratio[where] = img[where] / np.maximum(level, np.float32(1e-6))

    r_shell = ratio[shell | (band & ~cart)]  # outside the model's cartilage, within reach of it
    dark = r_shell[r_shell < 0.9]  # clearly darker or brighter than cartilage, beyond its noise
    bright = r_shell[r_shell > 1.1]
    if dark.size < MIN_VOXELS:
        # no darker neighbour to tell cartilage from: not an image this step understands
        return None, level_grid
    lo = 0.5 * (1.0 + float(np.percentile(dark, NEIGHBOUR_PERCENTILE)))
    # fluid, when the shell sees enough of it; otherwise only an upper bound far above cartilage
    hi = (
        0.5 * (1.0 + float(np.percentile(bright, 100 - NEIGHBOUR_PERCENTILE)))
        if bright.size >= MIN_VOXELS // 4
        else 2.0
    )
    hi = max(hi, 1.1)

    r_band = ratio[band]
    keep = (r_band >= lo) & (r_band <= hi)
    # A voxel the model left out that is brighter than cartilage is added only where it lies between
    # cartilage and clear fluid: a fluid film thinner than a voxel, between cartilage and darker fat, blurs to
    # cartilage's level and would be absorbed (+15 % on a coronal trochlea), while cartilage's own edge next
    # to fluid reads brighter than cartilage through the point-spread function and must still be reachable.
    fluid = (ratio > hi) & ~cart  # ratio is 0 outside band | shell
    keep &= cart[band] | (r_band <= 1.0) | _between(cart, fluid)[band]
    new_cart = core.copy()
    new_cart[band] = keep
    # drop pieces that hold none of the untouched interior
    import cc3d

    pieces, count = cc3d.connected_components(new_cart, connectivity=26, return_N=True)
    anchored = np.unique(pieces[core])
    if anchored.size - int(anchored[0] == 0) < count:  # some piece holds no interior (else nothing to drop)
        good = np.zeros(count + 1, dtype=bool)
        good[anchored] = True
        good[0] = False
        new_cart = good[pieces]

    added = new_cart & ~cart
    removed = cart & ~new_cart
    if not added.any() and not removed.any():
        return None, level_grid
    out = lab.copy()
    # removed voxels: darker than cartilage -> a neighbouring non-cartilage label (bone, meniscus), else 0
    out[removed] = 0
    dark_removed = removed & (ratio < 1.0)
    if dark_removed.any():
        other = lab.copy()
        other[cart] = 0
        _fill_from_neighbours(out, dark_removed, other)
    # added voxels: the nearest cartilage label
    cart_labels = np.multiply(lab, cart & new_cart, dtype=np.uint8)
    out[added] = 0
    _fill_from_neighbours(out, added, cart_labels)
    return out, level_grid


def _is_cartilage(labels: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Where *labels* is a cartilage label (consecutive values: one compare, uint8 wrap-around below)."""
    low, high = min(CARTILAGE_LABELS), max(CARTILAGE_LABELS)
    return (labels - np.uint8(low)) <= np.uint8(high - low)


def _fill_from_neighbours(
    out: NDArray[np.uint8],
    targets: NDArray[np.bool_],
    source: NDArray[np.uint8],
    rounds: int = 2 * BAND_VOXELS + 2,
) -> None:
    """Give each *targets* voxel the largest *source* label among its face neighbours, spreading through
    targets for a few rounds (so a target a few steps from any source still gets one); in place on *out*."""
    shape = out.shape
    flat_src = source.ravel().copy()
    todo = np.flatnonzero(targets.ravel())
    strides = (shape[1] * shape[2], shape[2], 1)
    coords = np.unravel_index(todo, shape)
    for _ in range(rounds):
        if todo.size == 0:
            break
        best = np.zeros(todo.size, dtype=np.uint8)
        for axis in range(3):
            c = coords[axis]
            for step in (-1, 1):
                ok = (c + step >= 0) & (c + step < shape[axis])
                idx = todo[ok] + step * strides[axis]
                best[ok] = np.maximum(best[ok], flat_src[idx])
        done = best > 0
        flat_src[todo[done]] = best[done]
        out.ravel()[todo[done]] = best[done]  # out is C-contiguous: ravel is a view
        todo = todo[~done]
        coords = tuple(c[~done] for c in coords)


def _pairs(axis: int, gap: int = 1) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Index tuples of a 3-D array such that ``a[low]`` and ``a[high]`` are voxels *gap* steps apart along
    *axis* (face neighbours for ``gap=1``)."""
    low, high = [slice(None)] * 3, [slice(None)] * 3
    low[axis], high[axis] = slice(0, -gap), slice(gap, None)
    return tuple(low), tuple(high)


def _eroded(mask: NDArray[np.bool_], steps: int) -> NDArray[np.bool_]:
    """Binary erosion by the 6-neighbourhood, *steps* times, outside the array counting as False (as
    ``scipy.ndimage.binary_erosion`` with its defaults): by shifted slices, several times faster on a knee."""
    for _ in range(steps):
        out = mask.copy()
        for axis in range(3):
            low, high = _pairs(axis)
            out[low] &= mask[high]
            out[high] &= mask[low]
            edge = [slice(None)] * 3
            for end in (0, -1):
                edge[axis] = end
                out[tuple(edge)] = False
        mask = out
    return mask


def _dilated(mask: NDArray[np.bool_], steps: int) -> NDArray[np.bool_]:
    """Binary dilation by the 6-neighbourhood, *steps* times (as ``scipy.ndimage.binary_dilation``)."""
    for _ in range(steps):
        out = mask.copy()
        for axis in range(3):
            low, high = _pairs(axis)
            out[low] |= mask[high]
            out[high] |= mask[low]
        mask = out
    return mask


def _between(inner: NDArray[np.bool_], outer: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Voxels with an *inner* face neighbour on one side and an *outer* one on the opposite side, along any
    axis: the voxel layer between two tissues."""
    out = np.zeros(inner.shape, dtype=bool)
    for axis in range(3):
        low, high = _pairs(axis, gap=2)
        middle = list(low)
        middle[axis] = slice(1, -1)
        out[tuple(middle)] |= (inner[low] & outer[high]) | (outer[low] & inner[high])
    return out


@dataclass(frozen=True)
class _LevelGrid:
    """The local cartilage level on a coarse grid: ``level[i, j, k]`` for the block of ``factors`` voxels."""

    level: NDArray[np.float32]
    factors: tuple[int, int, int]


def _level_grid(
    img: NDArray[np.float32], interior: NDArray[np.bool_], spacing: tuple[float, float, float]
) -> _LevelGrid:
    """The cartilage interior's mean intensity on a ``BLOCK_MM`` grid, Gaussian-smoothed (normalised
    convolution, so blocks without interior take their neighbours' level)."""
    fx, fy, fz = (max(1, round(BLOCK_MM / s)) for s in spacing)
    factors = (fx, fy, fz)
    # block sums by reduceat along each axis in turn (a last, partial block sums what there is)
    w = interior.astype(np.float32)
    v = np.where(interior, img, np.float32(0))
    for axis, f in enumerate(factors):
        starts = np.arange(0, img.shape[axis], f)
        w = np.add.reduceat(w, starts, axis=axis)
        v = np.add.reduceat(v, starts, axis=axis)
    ws = ndi.gaussian_filter(w, SMOOTH_BLOCKS, mode="nearest")
    vs = ndi.gaussian_filter(v, SMOOTH_BLOCKS, mode="nearest")
    overall = float(v.sum() / max(float(w.sum()), 1.0))
    floor = 1e-3 * max(float(ws.max()), 1e-9)
    level = np.where(ws > floor, vs / np.maximum(ws, floor), overall).astype(np.float32)
    return _LevelGrid(level, factors)


def _read_level(grid: _LevelGrid, points: tuple[NDArray[np.intp], ...]) -> NDArray[np.float32]:
    """The level at each of *points* (index arrays), by linear interpolation between block centres."""
    # block centres sit at (i + 0.5) * f - 0.5 in voxel units
    coords = np.stack(
        [(p.astype(np.float32) + 0.5) / f - 0.5 for p, f in zip(points, grid.factors, strict=True)]
    )
    return ndi.map_coordinates(grid.level, coords, order=1, mode="nearest").astype(np.float32)
