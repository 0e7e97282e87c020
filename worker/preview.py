"""``preview.png``: the labels over the source image, three slices in each of three planes, for a quick look.

Each row of the montage is one plane (sagittal, coronal, axial when the affine is known; otherwise the planes
across i, j and k), each column one slice: through the centre of the labelled knee and a quarter of its extent
to either side. Slices are shown in the usual viewer orientation (superior up; anterior up in axial slices;
patient right on the left of coronal and axial slices, anterior on the left of sagittal slices) with their
physical aspect ratio from the voxel spacing. The grey scale is windowed between the 1st and 99.5th
percentiles of the image; labels are filled semi-transparently in the colours of :mod:`openmsk.labels` (the
SEG's colours) with opaque outlines, and a legend names the tissues present.

Pillow and numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from openmsk.atomic import atomic_file
from openmsk.labels import TISSUES, tissues_present

__all__ = ["FILL_ALPHA", "TILE_PX", "write_preview"]

TILE_PX = 256  # each slice is scaled to fit a square of this many pixels
FILL_ALPHA = 0.4  # fill opacity: the anatomy must stay visible under the colour
_GAP = 4
_LEGEND_ROW_PX = 18


@dataclass(frozen=True)
class _Plane:
    """How to cut and show one plane: the fixed voxel axis, the display axes and their flips."""

    name: str
    fixed: int  # voxel axis held constant
    vertical: int  # voxel axis shown top to bottom
    horizontal: int  # voxel axis shown left to right
    flip_vertical: bool
    flip_horizontal: bool
    reverse_slices: bool = False  # show the slices in decreasing index order


def _planes(affine: NDArray[np.float64] | None) -> list[_Plane]:
    """The three display planes for a grid with *affine* (voxel -> LPS); plain voxel planes without."""
    if affine is None:
        return [
            _Plane("slice (k)", 2, 1, 0, False, False),
            _Plane("column (i)", 0, 2, 1, False, False),
            _Plane("row (j)", 1, 2, 0, False, False),
        ]
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    dominant = np.abs(directions).argmax(
        axis=0
    )  # patient axis (0 x L, 1 y P, 2 z S) each voxel axis runs along
    signs = np.sign(directions[dominant, np.arange(3)])
    # Per view: the patient axis across which it cuts (and whether its slices go along it, left to right in
    # the montage), the one shown vertically (and whether it increases downwards) and the one shown
    # horizontally (and whether it increases to the right).
    views = (
        ("sagittal", (0, True), (2, False), (1, True)),  # right to left; superior up, anterior left
        (
            "coronal",
            (1, True),
            (2, False),
            (0, True),
        ),  # anterior to posterior; superior up, patient right left
        ("axial", (2, False), (1, True), (0, True)),  # superior to inferior; anterior up, patient right left
    )
    planes: list[_Plane] = []
    for name, (normal_axis, forward), (v_axis, v_down), (_, h_right) in views:
        fixed = _voxel_axis(dominant, normal_axis, exclude=())
        vertical = _voxel_axis(dominant, v_axis, exclude=(fixed,))
        horizontal = next(a for a in range(3) if a not in (fixed, vertical))
        # Increasing voxel index runs along +axis when the sign is positive; flip where that is not the way
        # the view wants it.
        flip_v = (signs[vertical] > 0) != v_down
        flip_h = (signs[horizontal] > 0) != h_right
        reverse = (signs[fixed] > 0) != forward
        planes.append(_Plane(name, fixed, vertical, horizontal, bool(flip_v), bool(flip_h), bool(reverse)))
    return planes


def _voxel_axis(dominant: NDArray[np.int64], patient_axis: int, exclude: Sequence[int]) -> int:
    """The voxel axis running along *patient_axis* (the first free one if an oblique grid has none)."""
    for axis in range(3):
        if axis not in exclude and dominant[axis] == patient_axis:
            return axis
    return next(a for a in range(3) if a not in exclude)


def _window(image: NDArray[Any]) -> tuple[float, float]:
    """Grey-scale window from the 1st to the 99.5th percentile (of a subsample, which is enough)."""
    flat = np.asarray(image).ravel(order="K")  # no copy, whatever the memory layout
    sample = flat[:: max(1, flat.size // 2_000_000)].astype(np.float64)
    lo, hi = np.percentile(sample, [1.0, 99.5])
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _slice_positions(labelled: NDArray[np.bool_], axis: int) -> list[int]:
    """Centre of the labelled region (mask *labelled*) along *axis* and a quarter of its extent either side."""
    n = labelled.shape[axis]
    other = tuple(a for a in range(3) if a != axis)
    profile = np.count_nonzero(labelled, axis=other).astype(np.float64)
    present = np.nonzero(profile)[0]
    if len(present) == 0:
        lo, hi = 0, n - 1
        centre = (n - 1) // 2
    else:
        lo, hi = int(present[0]), int(present[-1])
        centre = round(float(np.arange(n) @ profile) / profile.sum())
    quarter = max(1, (hi - lo) // 4)
    return sorted({int(np.clip(centre + d, 0, n - 1)) for d in (-quarter, 0, quarter)})


def _cut(volume: NDArray[Any], plane: _Plane, index: int) -> NDArray[Any]:
    """The 2D slice of *volume* at *index* along ``plane.fixed``, as (vertical, horizontal) display rows."""
    # Basic indexing gives a view; np.take would copy through the whole (often strided) volume.
    cut = volume[(slice(None),) * plane.fixed + (index,)]
    remaining = [a for a in range(3) if a != plane.fixed]
    cut = cut.transpose(remaining.index(plane.vertical), remaining.index(plane.horizontal))
    if plane.flip_vertical:
        cut = cut[::-1, :]
    if plane.flip_horizontal:
        cut = cut[:, ::-1]
    return cut


def _tile(
    image: NDArray[Any],
    labels: NDArray[Any],
    plane: _Plane,
    index: int,
    spacing: Sequence[float],
    window: tuple[float, float],
    palette: NDArray[np.uint8],
    known: NDArray[np.bool_],
) -> Any:
    from PIL import Image

    grey = _cut(image, plane, index).astype(np.float32)
    lab = _cut(labels, plane, index)
    height_mm = grey.shape[0] * float(spacing[plane.vertical])
    width_mm = grey.shape[1] * float(spacing[plane.horizontal])
    scale = TILE_PX / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))

    lo, hi = window
    grey8 = (np.clip((grey - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    grey_img = Image.fromarray(np.ascontiguousarray(grey8)).resize(size, Image.Resampling.BILINEAR)
    lab8 = np.where(known[lab.clip(0, 255)], lab, 0).astype(np.uint8)
    # Labels resized with nearest neighbour: blending colours of neighbouring labels would invent tissues.
    lab_img = np.asarray(Image.fromarray(np.ascontiguousarray(lab8)).resize(size, Image.Resampling.NEAREST))

    rgb = np.repeat(np.asarray(grey_img, dtype=np.float32)[:, :, None], 3, axis=2)
    colour = palette[lab_img].astype(np.float32)
    inside = lab_img > 0
    edge = inside & _outline(lab_img)
    alpha = np.where(edge, 0.9, np.where(inside, FILL_ALPHA, 0.0))[:, :, None]
    rgb = rgb * (1.0 - alpha) + colour * alpha
    return Image.fromarray((rgb + 0.5).clip(0, 255).astype(np.uint8))


def _outline(lab: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Pixels with a 4-neighbour of another label (the boundary of each labelled region)."""
    edge = np.zeros(lab.shape, dtype=bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return edge


def write_preview(
    image: NDArray[Any],
    labels: NDArray[Any],
    affine_or_spacing: NDArray[Any] | Sequence[float],
    out_path: str | Path,
) -> Path:
    """Write the overlay montage of *labels* on *image* to *out_path* (PNG); return the path.

    Parameters
    ----------
    image: numpy.ndarray
        The source series, index (i, j, k), any real dtype.
    labels: numpy.ndarray
        Integer label map of the same shape (canonical OpenMSK labels; others are not drawn).
    affine_or_spacing: numpy.ndarray | Sequence[float]
        The 4x4 voxel -> patient LPS affine (planes named and oriented anatomically, spacing from its columns)
        or just the three spacings in mm along i, j, k (planes shown in voxel order).
    out_path: str | pathlib.Path
        Target PNG, written atomically.
    """
    from PIL import Image, ImageDraw, ImageFont

    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or labels.shape != image.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must be 3D arrays of one shape")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    given = np.asarray(affine_or_spacing, dtype=np.float64)
    if given.shape == (4, 4):
        affine: NDArray[np.float64] | None = given
        spacing = tuple(float(s) for s in np.linalg.norm(given[:3, :3], axis=0))
    elif given.shape == (3,):
        affine = None
        spacing = tuple(float(s) for s in given)
    else:
        raise ValueError("affine_or_spacing must be a 4x4 affine or three spacings")
    if not all(s > 0 for s in spacing):
        raise ValueError(f"spacings must be positive, got {spacing}")

    palette = np.zeros((256, 3), dtype=np.uint8)
    known = np.zeros(256, dtype=bool)
    for value, tissue in TISSUES.items():
        palette[value] = tissue.rgb
        known[value] = True
    window = _window(image)
    planes = _planes(affine)

    font = ImageFont.load_default()
    present = tissues_present(labels)
    labelled = labels > 0
    legend_rows = (len(present) + 2) // 3
    cell = TILE_PX + _GAP
    width = 3 * cell + _GAP
    height = 3 * (cell + _LEGEND_ROW_PX) + _GAP + legend_rows * _LEGEND_ROW_PX + _GAP
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)

    y = _GAP
    for plane in planes:
        positions = _slice_positions(labelled, plane.fixed)
        if plane.reverse_slices:
            positions.reverse()
        draw.text((_GAP, y), plane.name, fill=(230, 230, 230), font=font)
        y += _LEGEND_ROW_PX
        for column, index in enumerate(positions):
            tile = _tile(image, labels, plane, index, spacing, window, palette, known)
            x0 = _GAP + column * cell + (TILE_PX - tile.width) // 2
            y0 = y + (TILE_PX - tile.height) // 2
            canvas.paste(tile, (x0, y0))
        y += cell
    for n, tissue in enumerate(present):
        x = _GAP + (n % 3) * cell
        yy = y + (n // 3) * _LEGEND_ROW_PX
        draw.rectangle((x, yy + 3, x + 11, yy + 14), fill=tissue.rgb)
        draw.text((x + 16, yy + 2), tissue.display_name, fill=(230, 230, 230), font=font)

    path = Path(out_path)
    with atomic_file(path) as fh:
        canvas.save(fh, format="PNG", compress_level=1)  # 3: +30 % time, -10 % size; 6: 3x the time
    return path
