"""Thickness colour maps people can look at: one 2-D map per cartilage with a mm colour bar.

The maps are drawn the way regional thickness maps are shown in the literature: the femoral cartilage unrolled
around the knee's medio-lateral axis (angle around the axis through the condyles against ML position), the
tibial plateaus seen from above (ML x AP), the patellar cartilage seen from the front (ML x SI). Positions are
taken in an anatomical frame (:class:`AnatomicalFrame`: a rotation and origin in patient LPS mm), never in the
image axes, so the same knee gives the same map in any acquisition plane. Until the analysis provides the
bone-derived frame, the default frame is the patient axes (L, P, S) centred on the cartilage: the patient's
axes are anatomical for a supine, straight knee, which is what the phantoms and most protocols give.

Thickness per map cell comes, where the caller passes them, from the analysis' own per-face thickness
(``worker.analysis.face_thickness``: the ray-cast values the report summarises): the area-weighted mean of the
measured faces whose cartilage voxel falls in the cell, spread over the gaps between faces by a normalised
Gaussian of one voxel. The map's median then matches the reported median (within 0.2 % on the phantoms).
Otherwise it is **volume per unit of surface**: the cartilage volume whose voxel centres fall in the
cell divided by the cell's area on the surface (ML x angle x mean radius for the unrolled femur; ML x AP and
ML x SI for the projections). For a sheet crossing a cell that is its mean thickness along the projection
direction, without thresholds or voxel counting across the sheet; cells at the cut edge of a sheet are only
partly covered and read thinner. This proxy needs the label map alone, but it is the thickness along the
projection, not along the bone normal: on the phantoms the tibial map's median is within 3 % of the
reported one, the patellar +8 % and the femoral +19-23 % (where the sheet curves away from the unrolling
axis); the numbers of the report and the SR are always the analysis' own.

Pillow and numpy only (matplotlib is not a dependency of the node).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from openmsk.atomic import atomic_file

__all__ = [
    "MAPS",
    "AnatomicalFrame",
    "MapSpec",
    "ThicknessMap",
    "colourise",
    "thickness_maps",
    "write_thickness_maps",
]

# Map cell sizes: 1 mm along ML/AP/SI; 3 degrees around the femoral axis (about 1.3 mm on a 25 mm condyle).
CELL_MM = 1.0
CELL_DEG = 3.0
# Colour scale: 0 to the largest thickness rounded up to whole mm, at least this (a thin knee is not all red).
MIN_SCALE_MM = 3.0
PIXELS_PER_CELL = 4
# Perceptually ordered colour scale (viridis' anchor colours, interpolated linearly).
_SCALE_ANCHORS = np.array(
    [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64
)
_BACKGROUND = (40, 40, 40)
_TEXT = (230, 230, 230)


@dataclass(frozen=True)
class AnatomicalFrame:
    """The knee's frame: ``rotation`` rows are the unit x (medio-lateral, towards patient left), y (antero-
    posterior, towards posterior) and z (towards superior) axes in patient LPS; ``origin`` in LPS mm."""

    rotation: NDArray[np.float64]
    origin: NDArray[np.float64]

    def __post_init__(self) -> None:
        rotation = np.asarray(self.rotation, dtype=np.float64)
        origin = np.asarray(self.origin, dtype=np.float64)
        if rotation.shape != (3, 3) or origin.shape != (3,):
            raise ValueError("an anatomical frame needs a 3x3 rotation and a 3-vector origin")
        if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-6) or np.linalg.det(rotation) < 0:
            raise ValueError("the frame's rotation must be a proper rotation (orthonormal, determinant +1)")
        object.__setattr__(self, "rotation", rotation)
        object.__setattr__(self, "origin", origin)

    @classmethod
    def patient_axes(cls, origin: Sequence[float] = (0.0, 0.0, 0.0)) -> AnatomicalFrame:
        """The patient's own axes (L, P, S) at *origin*."""
        return cls(np.eye(3), np.asarray(origin, dtype=np.float64))

    @classmethod
    def from_grid_axes(
        cls,
        axes: dict[str, Sequence[float]],
        affine_lps: NDArray[Any],
        origin: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> AnatomicalFrame | None:
        """The frame from the analysis' knee axes (``region_frame["axes"]``: unit ``medial``, ``anterior``,
        ``superior`` vectors in the grid's mm space, i.e. voxel index x spacing), or ``None`` when they do not
        make a frame (missing, degenerate).

        The medial axis is turned to point towards patient left (so a left and a right knee are drawn the
        same way round, with the patient's right on the left as in a radiological view of both).
        """
        affine = np.asarray(affine_lps, dtype=np.float64)[:3, :3]
        spacing = np.linalg.norm(affine, axis=0)
        try:
            grid = [np.asarray(axes[name], dtype=np.float64) for name in ("medial", "anterior", "superior")]
        except (KeyError, TypeError, ValueError):
            return None
        # Grid mm -> LPS: the affine's directions (its columns divided by the spacing).
        lps = [affine @ (v / spacing) for v in grid]
        x = lps[0] if lps[0][0] >= 0 else -lps[0]
        y, z = -lps[1], lps[2]
        rows = []
        for v in (x, y, z):  # Gram-Schmidt: the analysis' axes are orthogonal up to rounding
            for r in rows:
                v = v - (v @ r) * r
            norm = float(np.linalg.norm(v))
            if norm < 1e-6:
                return None
            rows.append(v / norm)
        rotation = np.array(rows)
        if np.linalg.det(rotation) < 0:
            rotation[1] = -rotation[1]  # the analysis' frame is left-handed here: keep ML and SI, flip AP
            if rotation[1] @ -lps[1] < 0:
                return None
        return cls(rotation, np.asarray(origin, dtype=np.float64))

    def coordinates(self, points_lps: NDArray[np.float64]) -> NDArray[np.float64]:
        """(n, 3) points in LPS mm -> (n, 3) frame coordinates (x ML, y AP, z SI) in mm."""
        return (np.asarray(points_lps, dtype=np.float64) - self.origin) @ self.rotation.T


@dataclass(frozen=True)
class MapSpec:
    """One map: its file name, title, the cartilage labels drawn, and how it is unrolled or projected."""

    name: str
    title: str
    labels: tuple[int, ...]
    projection: str  # "unrolled" (femur), "axial" (from above), "frontal" (from the front)
    #: patient directions of increasing column and row (DICOM PatientOrientation) in the default frame
    orientation: tuple[str, str] = ("L", "P")


MAPS: tuple[MapSpec, ...] = (
    MapSpec("femoral", "Femoral cartilage thickness (unrolled)", (4,), "unrolled"),
    MapSpec("tibial", "Tibial cartilage thickness (from above)", (5, 6), "axial"),
    MapSpec("patellar", "Patellar cartilage thickness (from the front)", (7,), "frontal", ("L", "F")),
)


@dataclass(frozen=True)
class ThicknessMap:
    """A computed map: thickness per cell (mm, NaN where no cartilage), its axes, and the rendered image."""

    spec: MapSpec
    thickness_mm: NDArray[np.float64]  # (rows, columns)
    extent: tuple[float, float, float, float]  # column axis min/max, row axis top/bottom
    axis_names: tuple[str, str]  # (columns, rows)
    rgb: NDArray[np.uint8] = field(repr=False)  # the rendered PNG's pixels, (height, width, 3)
    scale_mm: float = MIN_SCALE_MM
    path: Path | None = None

    @property
    def mean_mm(self) -> float:
        """The area-weighted mean over covered cells (each cell is the same area on the map)."""
        return float(np.nanmean(self.thickness_mm))


def _voxel_points(mask: NDArray[np.bool_], affine_lps: NDArray[np.float64]) -> NDArray[np.float64]:
    ijk = np.argwhere(mask).astype(np.float64)
    return ijk @ affine_lps[:3, :3].T + affine_lps[:3, 3]


def _accumulate(
    u: NDArray[np.float64], v: NDArray[np.float64], weight: NDArray[np.float64], du: float, dv: float
) -> tuple[NDArray[np.float64], tuple[float, float, float, float]]:
    """Sum *weight* into cells of size (du, dv) over (u, v); rows run along v from its top (largest) value."""
    u0, v1 = np.floor(u.min() / du) * du, np.ceil(v.max() / dv) * dv
    col = np.floor((u - u0) / du).astype(np.int64)
    row = np.floor((v1 - v) / dv).astype(np.int64)
    shape = (int(row.max()) + 1, int(col.max()) + 1)
    grid = np.bincount(row * shape[1] + col, weights=weight, minlength=shape[0] * shape[1]).reshape(shape)
    return grid, (float(u0), float(u0 + shape[1] * du), float(v1), float(v1 - shape[0] * dv))


def _fill_gaps(density: NDArray[np.float64], sigma_cells: float) -> NDArray[np.float64]:
    """Spread voxel columns over the cells between them: voxels larger than a cell leave empty cells inside
    the sheet's footprint (and put a whole voxel's volume into one cell). A normalised Gaussian over the
    footprint (cells with cartilage, closed over gaps of a voxel) averages that aliasing out; NaN outside."""
    from scipy import ndimage as ndi

    reach = max(1, int(np.ceil(sigma_cells)))
    padded = np.pad(density > 0, reach)
    footprint = ndi.binary_closing(padded, structure=np.ones((3, 3), bool), iterations=reach)
    footprint = footprint[reach:-reach, reach:-reach] | (density > 0)
    weight = ndi.gaussian_filter(footprint.astype(np.float64), sigma_cells, mode="constant", truncate=3.0)
    spread = ndi.gaussian_filter(
        np.where(footprint, density, 0.0), sigma_cells, mode="constant", truncate=3.0
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(footprint, spread / weight, np.nan)


def _map_values(
    spec: MapSpec,
    labels: NDArray[Any],
    affine_lps: NDArray[np.float64],
    frame: AnatomicalFrame,
) -> tuple[NDArray[np.float64], tuple[float, float, float, float], tuple[str, str]] | None:
    mask = labels == spec.labels[0]
    for label in spec.labels[1:]:
        mask |= labels == label
    if not mask.any():
        return None
    voxel_mm3 = float(abs(np.linalg.det(affine_lps[:3, :3])))
    # Gaussian width of the gap filling: the largest voxel edge, in cells.
    sigma = float(np.linalg.norm(affine_lps[:3, :3], axis=0).max()) / CELL_MM
    xyz = frame.coordinates(_voxel_points(mask, affine_lps))
    volume = np.full(len(xyz), voxel_mm3)
    if spec.projection == "axial":
        # From above: ML across, anterior at the top (y grows towards posterior, so rows run along -y).
        grid, extent = _accumulate(xyz[:, 0], -xyz[:, 1], volume, CELL_MM, CELL_MM)
        return (
            _fill_gaps(grid / (CELL_MM * CELL_MM), sigma),
            extent,
            ("medio-lateral (mm, patient left +)", "anterior (mm)"),
        )
    if spec.projection == "frontal":
        grid, extent = _accumulate(xyz[:, 0], xyz[:, 2], volume, CELL_MM, CELL_MM)
        return (
            _fill_gaps(grid / (CELL_MM * CELL_MM), sigma),
            extent,
            ("medio-lateral (mm, patient left +)", "superior (mm)"),
        )
    # Unrolled femur: angle around the ML axis through the condyles' centre; 0 degrees = distal, +90 =
    # anterior, -90 = posterior. Each cell's surface area is ML width x angle (rad) x mean radius in the cell.
    centre = _condyle_centre(xyz[_largest_piece(mask)])
    anterior = -(xyz[:, 1] - centre[0])
    distal = -(xyz[:, 2] - centre[1])
    angle = np.degrees(np.arctan2(anterior, distal))
    radius = np.hypot(anterior, distal)
    grid, extent = _accumulate(xyz[:, 0], angle, volume, CELL_MM, CELL_DEG)
    radii, _ = _accumulate(xyz[:, 0], angle, radius, CELL_MM, CELL_DEG)
    counts, _ = _accumulate(xyz[:, 0], angle, np.ones(len(xyz)), CELL_MM, CELL_DEG)
    with np.errstate(invalid="ignore", divide="ignore"):
        density = np.where(counts > 0, grid / (CELL_MM * np.radians(CELL_DEG) * (radii / counts)), 0.0)
    return (
        _fill_gaps(density, sigma),
        extent,
        ("medio-lateral (mm, patient left +)", "angle (deg; +90 anterior, 0 distal)"),
    )


_AXIS_NAMES = {
    "axial": ("medio-lateral (mm, patient left +)", "anterior (mm)"),
    "frontal": ("medio-lateral (mm, patient left +)", "superior (mm)"),
    "unrolled": ("medio-lateral (mm, patient left +)", "angle (deg; +90 anterior, 0 distal)"),
}


def _projected(
    spec: MapSpec, xyz: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """(column coordinate, row coordinate, row cell size) of frame points on *spec*'s map."""
    if spec.projection == "axial":
        return xyz[:, 0], -xyz[:, 1], CELL_MM
    if spec.projection == "frontal":
        return xyz[:, 0], xyz[:, 2], CELL_MM
    centre = _condyle_centre(xyz)
    return xyz[:, 0], np.degrees(np.arctan2(-(xyz[:, 1] - centre[0]), -(xyz[:, 2] - centre[1]))), CELL_DEG


def _face_map_values(
    spec: MapSpec,
    faces: Mapping[int, Any],
    affine_lps: NDArray[np.float64],
    frame: AnatomicalFrame,
) -> tuple[NDArray[np.float64], tuple[float, float, float, float], tuple[str, str]] | None:
    """The map from the analysis' own per-face thickness: the area-weighted mean of the measured faces in a
    cell (at the cartilage voxel across each face), spread over the gaps between faces like the volume map."""
    from scipy import ndimage as ndi

    points, values, weights = [], [], []
    for label in spec.labels:
        f = faces.get(label)
        if f is None:
            continue
        kept = np.asarray(f.kept, dtype=bool)
        if not kept.any():
            continue
        points.append(np.asarray(f.cartilage_voxels)[kept])
        values.append(np.asarray(f.thickness, dtype=np.float64))
        weights.append(np.asarray(f.weight, dtype=np.float64)[kept])
    if not points:
        return None
    ijk = np.concatenate(points).astype(np.float64)
    xyz = frame.coordinates(ijk @ affine_lps[:3, :3].T + affine_lps[:3, 3])
    t, w = np.concatenate(values), np.concatenate(weights)
    u, v, dv = _projected(spec, xyz)
    num, extent = _accumulate(u, v, t * w, CELL_MM, dv)
    den, _ = _accumulate(u, v, w, CELL_MM, dv)
    sigma = float(np.linalg.norm(affine_lps[:3, :3], axis=0).max()) / CELL_MM
    reach = max(1, int(np.ceil(sigma)))
    footprint = ndi.binary_closing(np.pad(den > 0, reach), structure=np.ones((3, 3), bool), iterations=reach)
    footprint = footprint[reach:-reach, reach:-reach] | (den > 0)
    spread_num = ndi.gaussian_filter(num, sigma, mode="constant", truncate=3.0)
    spread_den = ndi.gaussian_filter(den, sigma, mode="constant", truncate=3.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(footprint & (spread_den > 0), spread_num / spread_den, np.nan)
    return out, extent, _AXIS_NAMES[spec.projection]


def _largest_piece(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Which of *mask*'s voxels (in ``np.argwhere`` order) belong to its largest connected piece: a model's
    stray cartilage behind the tibia (11 % of the voxels on a full-size knee) lies on a larger circle with
    the sheet, and fitting it too put the axis below the condyles, so the sheet unrolled edge-on."""
    from scipy import ndimage as ndi

    pieces, count = ndi.label(mask)
    inside = pieces[mask]
    if count <= 1:
        return np.ones(len(inside), dtype=bool)
    return inside == np.argmax(np.bincount(inside)[1:]) + 1


def _condyle_centre(cartilage: NDArray[np.float64]) -> tuple[float, float]:
    """(y, z) of the femoral axis: the centre of the circle that fits the femoral cartilage best in the
    sagittal projection (algebraic least squares, Kasa's fit): in the sagittal plane the condyles' articular
    surface is close to a circle, so the unrolling angle then runs along the sheet and the radius across it."""
    y, z = cartilage[:, 1], cartilage[:, 2]
    design = np.column_stack([y, z, np.ones_like(y)])
    (a, b, _), *_ = np.linalg.lstsq(design, y * y + z * z, rcond=None)
    return float(a / 2), float(b / 2)


def colourise(values: NDArray[np.float64], scale_mm: float) -> NDArray[np.uint8]:
    """Thickness (mm) -> RGB on the map's colour scale (0..*scale_mm*); NaN -> the background grey."""
    t = np.clip(np.nan_to_num(values, nan=0.0) / scale_mm, 0.0, 1.0) * (len(_SCALE_ANCHORS) - 1)
    low = np.minimum(np.floor(t).astype(np.int64), len(_SCALE_ANCHORS) - 2)
    frac = (t - low)[..., None]
    rgb = _SCALE_ANCHORS[low] * (1 - frac) + _SCALE_ANCHORS[low + 1] * frac
    rgb[np.isnan(values)] = _BACKGROUND
    return np.rint(rgb).astype(np.uint8)


def _render(
    spec: MapSpec,
    values: NDArray[np.float64],
    extent: tuple[float, float, float, float],
    axis_names: tuple[str, str],
    scale_mm: float,
    laterality: str | None,
) -> NDArray[np.uint8]:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cells = colourise(values, scale_mm)
    body = np.repeat(np.repeat(cells, PIXELS_PER_CELL, axis=0), PIXELS_PER_CELL, axis=1)
    height, width = body.shape[:2]
    margin_l, margin_t, margin_b, bar_w = 60, 30, 40, 90
    canvas = Image.new("RGB", (margin_l + width + bar_w, margin_t + max(height, 200) + margin_b), _BACKGROUND)
    canvas.paste(Image.fromarray(body), (margin_l, margin_t))
    draw = ImageDraw.Draw(canvas)
    knee = {"R": "right knee", "L": "left knee"}.get(laterality or "", "knee")
    draw.text((margin_l, 8), f"{spec.title}, {knee}", fill=_TEXT, font=font)
    draw.text((margin_l, margin_t + height + 6), f"{extent[0]:.0f}", fill=_TEXT, font=font)
    draw.text((margin_l + width - 24, margin_t + height + 6), f"{extent[1]:.0f}", fill=_TEXT, font=font)
    draw.text((margin_l, margin_t + height + 20), axis_names[0], fill=_TEXT, font=font)
    draw.text((4, margin_t), f"{extent[2]:.0f}", fill=_TEXT, font=font)
    draw.text((4, margin_t + height - 12), f"{extent[3]:.0f}", fill=_TEXT, font=font)
    draw.text((4, margin_t + height // 2), axis_names[1].split(" ")[0], fill=_TEXT, font=font)
    # Colour bar: 0 mm at the bottom, the scale's top at the top, a tick per mm.
    bar_h = max(height, 200)
    x0 = margin_l + width + 16
    ramp = colourise(np.linspace(scale_mm, 0.0, bar_h)[:, None].repeat(16, axis=1), scale_mm)
    canvas.paste(Image.fromarray(ramp), (x0, margin_t))
    for mm in range(int(scale_mm) + 1):
        y = margin_t + round((1 - mm / scale_mm) * (bar_h - 1))
        draw.line([(x0 + 16, y), (x0 + 20, y)], fill=_TEXT)
        draw.text((x0 + 23, y - 6), f"{mm}", fill=_TEXT, font=font)
    draw.text((x0, margin_t + bar_h + 6), "mm", fill=_TEXT, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def thickness_maps(
    labels: NDArray[Any],
    affine_lps: NDArray[Any],
    *,
    frame: AnatomicalFrame | None = None,
    laterality: str | None = None,
    rotation: NDArray[Any] | None = None,
    faces: Mapping[int, Any] | None = None,
) -> list[ThicknessMap]:
    """The maps of the cartilages present in *labels* (canonical tissue labels, index (i, j, k)).

    Parameters
    ----------
    labels: numpy.ndarray
        The tissue label map (femur 1, cartilages 4-7).
    affine_lps: numpy.ndarray
        4x4 voxel (i, j, k) -> patient LPS mm.
    frame: AnatomicalFrame | None
        The knee's anatomical frame; default: *rotation* (else the patient axes) at the centroid of the
        cartilage.
    rotation: numpy.ndarray | None
        The frame's rotation alone (:attr:`AnatomicalFrame.rotation`), when the caller has no origin.
    faces: Mapping[int, worker.analysis.FaceThickness] | None
        The analysis' per-face thickness by cartilage label: where given, a cartilage's map shows those
        values (the numbers the report summarises) instead of the volume-per-area proxy.
    laterality: str | None
        ``"R"`` or ``"L"``, named in the title.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    affine = np.asarray(affine_lps, dtype=np.float64)
    if labels.ndim != 3 or affine.shape != (4, 4):
        raise ValueError("labels must be 3-D and the affine 4x4")
    # Work on the box around the cartilage: a knee's cartilage is a few percent of the grid.
    small = labels.astype(np.uint8, copy=False)
    wanted = sorted({label for spec in MAPS for label in spec.labels})
    if small.flags.f_contiguous and not small.flags.c_contiguous:
        # find_objects is much slower across memory than along it: scan the C-ordered transpose of a
        # Fortran-ordered map (the pipeline's layout) and turn its boxes back.
        found = [None if b is None else b[::-1] for b in ndi.find_objects(small.T, max_label=max(wanted))]
    else:
        found = ndi.find_objects(small, max_label=max(wanted))
    boxes = [b for b in found[min(wanted) - 1 :] if b is not None]
    if not boxes:
        return []
    box = tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes)) for d in range(3))
    labels = small[box]
    offset = np.array([s.start for s in box], dtype=np.float64)
    full_affine = affine  # the faces' voxel indices are on the full grid
    affine = affine.copy()
    affine[:3, 3] += affine[:3, :3] @ offset
    if frame is None:
        cartilage = (labels >= min(wanted)) & (labels <= max(wanted))
        centre = _voxel_points(cartilage, affine).mean(axis=0)
        frame = AnatomicalFrame(np.eye(3) if rotation is None else np.asarray(rotation), centre)
    out = []
    for spec in MAPS:
        computed = _face_map_values(spec, faces, full_affine, frame) if faces else None
        if computed is None:
            computed = _map_values(spec, labels, affine, frame)
        if computed is None:
            continue
        values, extent, axis_names = computed
        scale = max(MIN_SCALE_MM, float(np.ceil(np.nanpercentile(values, 99))))
        rgb = _render(spec, values, extent, axis_names, scale, laterality)
        out.append(ThicknessMap(spec, values, extent, axis_names, rgb, scale))
    return out


def write_thickness_maps(
    labels: NDArray[Any],
    affine_lps: NDArray[Any],
    out_dir: str | Path,
    *,
    frame: AnatomicalFrame | None = None,
    laterality: str | None = None,
    rotation: NDArray[Any] | None = None,
    faces: Mapping[int, Any] | None = None,
) -> list[ThicknessMap]:
    """Compute the maps and write each as ``thickness_<name>.png`` in *out_dir* (atomically)."""
    from PIL import Image

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    maps = thickness_maps(
        labels, affine_lps, frame=frame, laterality=laterality, rotation=rotation, faces=faces
    )
    for m in maps:
        path = folder / f"thickness_{m.spec.name}.png"
        with atomic_file(path) as fh:
            Image.fromarray(m.rgb).save(fh, format="PNG")
        written.append(ThicknessMap(m.spec, m.thickness_mm, m.extent, m.axis_names, m.rgb, m.scale_mm, path))
    return written
