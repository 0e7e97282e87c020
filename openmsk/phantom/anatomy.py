"""The phantom knee as implicit shapes in patient space, and the image grids that sample it.

Every structure is a signed-distance-like function (negative inside, in mm) of knee-local coordinates
``m`` (toward the medial side), ``a`` (anterior) and ``u`` (superior), with the joint line at ``u = 0``.
The local frame maps to DICOM LPS as ``m = ±(x - cx)`` (+ for a right knee, whose medial side is patient left,
+x), ``a = -(y - cy)`` and ``u = z - cz``, so a left knee is the mirror image of a right one.

Cartilage sheets are offsets of the bone surfaces by the nominal thickness, so the thickness recorded in the
truth is the one the labels were built with. Evaluating the shapes at each voxel centre (instead of
resampling a label volume) makes every orientation exact and keeps the work vectorised.

Grid sizes (columns × rows × slices, spacing in mm):

* ``small``: 64 × 64 × 40 at 1.6 × 1.6 × 2.4 mm — a 102 × 102 × 96 mm field of view, the least that holds
  the distal femur, tibial plateau and patella of an adult knee in 64 pixels; cartilage (1.5–3 mm) is then
  about one to two voxels thick.
* ``medium``: 128 × 128 × 80 at 0.8 × 0.8 × 1.4 mm (102 × 102 × 112 mm): a grid fine enough that each
  cartilage subregion spans several voxels (on ``small`` a tibial third is three or four slices, so one
  slice more or less decides its Dice), yet generated in about a second.
* ``full``: 384 × 384 × 160 at 0.36 × 0.36 × 0.7 mm, like a clinical sagittal 3D DESS.
"""

from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from numpy.typing import NDArray

from openmsk.regions import REGIONS_BY_NAME

F32 = NDArray[np.float32]
Mask = NDArray[np.bool_]

# (columns, rows, slices) and (column spacing, row spacing, slice spacing) in mm; see the module docstring.
GRID_SIZES: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "small": ((64, 64, 40), (1.6, 1.6, 2.4)),
    "medium": ((128, 128, 80), (0.8, 0.8, 1.4)),
    "full": ((384, 384, 160), (0.36, 0.36, 0.7)),
}

# Cartilage thickness range (mm) drawn per sheet from the seed.
THICKNESS_RANGE = (1.5, 3.0)
# Half the fluid gap between opposing cartilage surfaces at the tibiofemoral contact (mm): keeps sheets apart.
JOINT_HALF_GAP = 0.6
# Field-of-view centre relative to the knee centre, local (m, a, u) in mm: the patella lies far anterior.
FOV_CENTRE_LOCAL = (0.0, 6.0, 8.0)
# Voxels evaluated per work unit: big enough to amortise numpy overhead, small enough to bound memory.
_CHUNK_VOXELS = 1_200_000


class Tissue(IntEnum):
    """Tissue classes behind the MR contrast; labels share tissues and some tissues have no label."""

    AIR = 0
    MARROW = 1
    CORTEX = 2
    CARTILAGE = 3
    MENISCUS = 4
    FLUID = 5
    FAT = 6
    MUSCLE = 7
    TENDON = 8


@dataclass(frozen=True)
class KneeParams:
    """Seed-derived anatomy: where the knee is, its scale and each cartilage sheet's nominal thickness."""

    seed: int
    laterality: str
    centre_lps: tuple[float, float, float]
    scale: float
    thickness_mm: dict[str, float]  # femoral/medial_tibial/lateral_tibial/patellar cartilage
    oblique_deg: float
    # Follow-up visits: cartilage thinned by this many mm in these subregions (openmsk.regions names).
    thinning_mm: tuple[tuple[str, float], ...] = ()

    @property
    def medial_sign(self) -> float:
        """+1 when medial is patient left (+x, right knee), -1 when it is patient right (left knee)."""
        return 1.0 if self.laterality == "R" else -1.0

    @property
    def local_to_lps(self) -> NDArray[np.float64]:
        """3x3 matrix taking local (m, a, u) offsets to LPS offsets (it is its own inverse)."""
        return np.diag([self.medial_sign, -1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """An image grid in patient space.

    Voxel [i, j, k] has its centre at ``origin + i·sx·row_dir + j·sy·col_dir + k·sz·normal``.
    """

    shape: tuple[int, int, int]  # (nx, ny, nz) = (columns, rows, slices)
    spacing: tuple[float, float, float]  # (sx, sy, sz) mm
    row_dir: NDArray[np.float64]  # direction of increasing column index i (DICOM IOP first triplet)
    col_dir: NDArray[np.float64]  # direction of increasing row index j (DICOM IOP second triplet)
    normal: NDArray[np.float64]  # row_dir × col_dir, direction of increasing slice index k
    origin: NDArray[np.float64]  # centre of voxel [0, 0, 0], LPS mm
    orientation: str

    @property
    def affine_lps(self) -> NDArray[np.float64]:
        """4x4 voxel index -> patient LPS mm."""
        aff = np.eye(4)
        aff[:3, 0] = self.row_dir * self.spacing[0]
        aff[:3, 1] = self.col_dir * self.spacing[1]
        aff[:3, 2] = self.normal * self.spacing[2]
        aff[:3, 3] = self.origin
        return aff


@dataclass(frozen=True)
class Sampled:
    """The anatomy sampled on a grid: labels (0–9), the tissue class behind each voxel's MR signal and the
    cartilage subregion of each cartilage voxel (:func:`sample_subregions`, 0 elsewhere)."""

    grid: Grid
    labels: NDArray[np.uint8]
    tissue: NDArray[np.uint8]
    regions: NDArray[np.uint8]


def knee_params(seed: int, laterality: str) -> KneeParams:
    """Draw the anatomy of knee *seed*; laterality only mirrors it and moves it to that side of the body."""
    rng = np.random.default_rng([seed, 1])  # stream 1: anatomy (other streams: contrast, noise)
    lo, hi = THICKNESS_RANGE
    names = ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage", "patellar_cartilage")
    thickness = {name: round(float(rng.uniform(lo, hi)), 2) for name in names}
    scale = round(float(rng.uniform(0.95, 1.05)), 3)
    jitter = rng.uniform(-5.0, 5.0, size=3)
    oblique = round(float(rng.uniform(15.0, 20.0)), 1)
    # A right knee sits on the patient's right (-x); both sit near the magnet isocentre, as in a knee coil.
    side = -14.0 if laterality == "R" else 14.0
    centre = (side + jitter[0], 6.0 + jitter[1], -18.0 + jitter[2])
    return KneeParams(
        seed=seed,
        laterality=laterality,
        centre_lps=tuple(round(float(c), 2) for c in centre),  # type: ignore[arg-type]
        scale=scale,
        thickness_mm=thickness,
        oblique_deg=oblique,
    )


def _directions(orientation: str, oblique_deg: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Row and column directions (LPS) of the usual scanner convention for each plane."""
    if orientation == "sagittal":
        return np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
    if orientation == "coronal":
        return np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])
    if orientation == "axial":
        return np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    if orientation == "oblique":
        # Sagittal turned about the superior axis, as when planning along the posterior condylar line.
        t = math.radians(oblique_deg)
        return np.array([-math.sin(t), math.cos(t), 0.0]), np.array([0.0, 0.0, -1.0])
    raise ValueError(f"unknown orientation {orientation!r}")


def make_grid(size: str, orientation: str, knee: KneeParams) -> Grid:
    """Place a *size* grid in *orientation*, centred on the knee's field-of-view centre."""
    shape, spacing = GRID_SIZES[size]
    row_dir, col_dir = _directions(orientation, knee.oblique_deg)
    normal = np.cross(row_dir, col_dir)
    fov_centre = np.asarray(knee.centre_lps) + knee.local_to_lps @ (np.asarray(FOV_CENTRE_LOCAL) * knee.scale)
    half = [(n - 1) / 2.0 * s for n, s in zip(shape, spacing, strict=True)]
    origin = fov_centre - half[0] * row_dir - half[1] * col_dir - half[2] * normal
    # Round so the geometry written to DICOM (decimal strings) is the geometry the labels were sampled on.
    origin = np.round(origin, 4)
    return Grid(shape, spacing, row_dir, col_dir, normal, origin, orientation)


# ------------------------------------------------------------------------------------------------------------
# Distance primitives (float32, approximate where exact is costly; all are exact at the axis extremes)


def _ellipsoid(px: F32, py: F32, pz: F32, rx: float, ry: float, rz: float) -> F32:
    """Approximate signed distance to an axis-aligned ellipsoid (first-order exact near the surface)."""
    k0 = np.sqrt((px / rx) ** 2 + (py / ry) ** 2 + (pz / rz) ** 2)
    k1 = np.sqrt((px / rx**2) ** 2 + (py / ry**2) ** 2 + (pz / rz**2) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _ellipse(px: F32, py: F32, rx: F32 | float, ry: F32 | float) -> F32:
    """Approximate signed distance to an infinite elliptic cylinder along the third axis."""
    k0 = np.sqrt((px / rx) ** 2 + (py / ry) ** 2)
    k1 = np.sqrt((px / (rx * rx)) ** 2 + (py / (ry * ry)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _round_box(px: F32, py: F32, pz: F32, half: tuple[float, float, float], r: float) -> F32:
    """Exact signed distance to a box with rounded edges (radius *r*)."""
    qx = np.abs(px) - (half[0] - r)
    qy = np.abs(py) - (half[1] - r)
    qz = np.abs(pz) - (half[2] - r)
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2 + np.maximum(qz, 0) ** 2)
    inside = np.minimum(np.maximum(np.maximum(qx, qy), qz), 0)
    return outside + inside - r


def _segment(
    px: F32, py: F32, pz: F32, p0: tuple[float, float, float], p1: tuple[float, float, float]
) -> F32:
    """Exact distance to the line segment p0–p1."""
    # Python floats, not numpy float64 scalars: those would promote the float32 arrays to float64.
    dx, dy, dz = (float(b - a) for a, b in zip(p0, p1, strict=True))
    wx, wy, wz = px - float(p0[0]), py - float(p0[1]), pz - float(p0[2])
    t = np.clip((wx * dx + wy * dy + wz * dz) / (dx * dx + dy * dy + dz * dz), 0.0, 1.0)
    return np.sqrt((wx - t * dx) ** 2 + (wy - t * dy) ** 2 + (wz - t * dz) ** 2)


def _smin(a: F32, b: F32, k: float) -> F32:
    """Smooth union (polynomial smooth minimum): blends bones where they meet instead of leaving a crease."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * (k * 0.25)


def _sigmoid(x: F32) -> F32:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# ------------------------------------------------------------------------------------------------------------
# The knee


class _Slab:
    """Local coordinates of one slab of voxels, and the sub-blocks of it that a local bounding box can touch.

    Each structure is evaluated only on its sub-block (a view): most of the field of view is far from most
    structures, so this does a fraction of the arithmetic of evaluating everything everywhere.
    """

    def __init__(self, m: F32, a: F32, u: F32, origin: NDArray[np.float64], steps: NDArray[np.float64]):
        self.m, self.a, self.u = m, a, u
        self.shape = m.shape
        self.origin = origin  # local coordinates of the slab's voxel [0, 0, 0]
        self.to_index = np.linalg.inv(steps.T)  # local offset -> voxel index offset
        last = np.array(self.shape) - 1
        corners = origin + np.array(list(itertools.product(*zip((0, 0, 0), last, strict=True)))) @ steps
        self.lo, self.hi = corners.min(axis=0), corners.max(axis=0)

    def crop(
        self, lo: tuple[float, float, float], hi: tuple[float, float, float]
    ) -> tuple[slice, ...] | None:
        """Index slices covering every voxel whose centre may lie in the local box lo..hi (None if none)."""
        lo_c, hi_c = np.maximum(lo, self.lo), np.minimum(hi, self.hi)
        if np.any(lo_c > hi_c):
            return None
        corners = np.array(list(itertools.product(*zip(lo_c, hi_c, strict=True))))
        idx = (corners - self.origin) @ self.to_index.T
        start = np.clip(np.floor(idx.min(axis=0)).astype(int) - 1, 0, self.shape)
        stop = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 2, 0, self.shape)
        if np.any(start >= stop):
            return None
        return tuple(slice(int(b), int(e)) for b, e in zip(start, stop, strict=True))

    def at(self, sl: tuple[slice, ...]) -> tuple[F32, F32, F32]:
        return self.m[sl], self.a[sl], self.u[sl]

    def box(
        self, centre: tuple[float, float, float], half: tuple[float, float, float]
    ) -> tuple[slice, ...] | None:
        """crop() for a box given by centre and half-widths."""
        lo = (centre[0] - half[0], centre[1] - half[1], centre[2] - half[2])
        hi = (centre[0] + half[0], centre[1] + half[1], centre[2] + half[2])
        return self.crop(lo, hi)


def _fill_ellipsoid(
    slab: _Slab,
    out: NDArray[np.uint8],
    value: int,
    centre: tuple[float, float, float],
    radii: tuple[float, ...],
) -> None:
    """Set *out* to *value* inside an axis-aligned ellipsoid."""
    sl = slab.box(centre, radii)
    if sl is not None:
        m, a, u = slab.at(sl)
        view = out[sl]
        view[_ellipsoid(m - centre[0], a - centre[1], u - centre[2], *radii) <= 0] = value


def _fill_segment(
    slab: _Slab,
    out: NDArray[np.uint8],
    value: int,
    p0: tuple[float, float, float],
    p1: tuple[float, float, float],
    radius: float,
) -> None:
    """Set *out* to *value* within *radius* of the segment p0–p1 (a tendon or ligament)."""
    lo = tuple(min(x, y) - radius for x, y in zip(p0, p1, strict=True))
    hi = tuple(max(x, y) + radius for x, y in zip(p0, p1, strict=True))
    sl = slab.crop(lo, hi)  # type: ignore[arg-type]
    if sl is not None:
        m, a, u = slab.at(sl)
        view = out[sl]
        view[_segment(m, a, u, p0, p1) < radius] = value


@dataclass(frozen=True)
class _Layout:
    """The knee's dimensions (mm, local coordinates) that the parts of :func:`_evaluate` share."""

    s: float  # scale
    tf: float  # cartilage thickness: femoral, medial and lateral tibial, patellar
    tm: float
    tl: float
    tp: float
    gap: float  # half the joint space
    margin: float  # mm beyond each bone: its cartilage shell, fluid film and smooth-union bulge fit inside
    zfb: float  # lowest point of both femoral condyles
    cz: float  # height of the condyles' centres
    a_pat: float  # the patella's centre (anterior, up)
    u_pat: float
    thinning: tuple[tuple[str, float], ...] = ()  # follow-up: mm taken off the sheet, per subregion name

    def thinned(self, name: str) -> float:
        """How much thinner than nominal the cartilage of subregion *name* is (mm)."""
        return sum(mm for region, mm in self.thinning if region == name)

    def thinning_table(self) -> NDArray[np.float32]:
        """Thinning (mm) indexed by subregion label."""
        table = np.zeros(256, dtype=np.float32)
        for name, mm in self.thinning:
            table[REGIONS_BY_NAME[name].label] += mm
        return table

    @classmethod
    def of(cls, knee: KneeParams) -> _Layout:
        s = knee.scale
        th = knee.thickness_mm
        tf, tp = th["femoral_cartilage"], th["patellar_cartilage"]
        gap = JOINT_HALF_GAP
        zfb = gap + tf  # so femoral cartilage ends `gap` above the joint line
        return cls(
            s=s,
            tf=tf,
            tm=th["medial_tibial_cartilage"],
            tl=th["lateral_tibial_cartilage"],
            tp=tp,
            gap=gap,
            margin=5.0,
            zfb=zfb,
            cz=zfb + 24 * s,
            a_pat=20 * s + tf + 2 * gap + tp + 10 * s,
            u_pat=zfb + 38 * s,
            thinning=tuple(knee.thinning_mm),
        )


# One part of the knee: the slab's index box it lies in (None: outside the slab) and its masks in that box.
_Part = tuple[tuple[slice, ...] | None, dict[str, Mask]]

# Labels, later assignments winning: bone over cartilage over menisci. (part, mask, label)
_LABEL_ORDER = (
    ("plateau", "lat_men", 9),
    ("plateau", "med_men", 8),
    ("patella", "pat_cart", 7),
    ("plateau", "lat_tc", 6),
    ("plateau", "med_tc", 5),
    ("femur", "fem_cart", 4),
    ("patella", "pat", 3),
    ("tibia", "tib", 2),
    ("femur", "fem", 1),
)
# Cortex/subchondral plate: the outer millimetre of each bone is dark on MR. (part, label, inner mask)
_CORTEX = (("femur", 1, "fem_inner"), ("tibia", 2, "tib_inner"), ("patella", 3, "pat_inner"))


def _evaluate(slab: _Slab, knee: KneeParams) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """Labels (0–9) and tissue classes at the slab's voxel centres.

    The bones and their cartilage (:func:`_femur`, :func:`_tibia`, :func:`_plateau`, :func:`_patella`) give
    the labels; the soft tissue around them (:func:`_soft_tissue`) and the bones' own classes
    (:func:`_bone_and_cartilage_classes`) give the tissue classes.
    """
    d = _Layout.of(knee)
    film = np.zeros(
        slab.shape, dtype=bool
    )  # thin layer along the articular surfaces where joint fluid collects
    parts = {
        "femur": _femur(slab, d, film),
        "tibia": _tibia(slab, d),
        "plateau": _plateau(slab, d, film),
        "patella": _patella(slab, d, film),
    }
    labels = np.zeros(slab.shape, dtype=np.uint8)
    for part, name, value in _LABEL_ORDER:
        sl, masks = parts[part]
        if sl is not None:
            view = labels[sl]
            view[masks[name]] = value
    tissue = _soft_tissue(slab, d, labels, film)
    del film
    _bone_and_cartilage_classes(tissue, labels, parts)
    return labels, tissue


def _femur(slab: _Slab, d: _Layout, film: Mask) -> _Part:
    """Two condyles (ellipsoids), a metaphyseal block and the shaft, blended; a groove cut anteriorly."""
    s, tf, zfb, cz, margin = d.s, d.tf, d.zfb, d.cz, d.margin
    fem_sl = slab.crop(
        (-40 * s - margin, -38 * s - margin, zfb - margin), (40 * s + margin, 23 * s + margin, math.inf)
    )
    if fem_sl is None:
        return None, {}
    m, a, u = slab.at(fem_sl)
    d_mc = _ellipsoid(m - 20 * s, a + 8 * s, u - cz, 13 * s, 30 * s, 24 * s)
    d_lc = _ellipsoid(m + 20 * s, a + 6 * s, u - cz, 14 * s, 29 * s, 24 * s)
    # The metaphysis narrows toward the shaft: shrink its cross-section above the condyles (g = 1 -> 1.8).
    g = 1.0 + 0.8 * np.clip((u - (zfb + 46 * s)) / (24 * s), 0.0, 1.0)
    d_blk = _round_box(m * g, (a + 4 * s) * g, u - (zfb + 45 * s), (34 * s, 24 * s, 21 * s), 10 * s) / g
    del g
    d_shaft = np.maximum(np.sqrt(m * m + (a + 2 * s) ** 2) - 15 * s, (zfb + 40 * s) - u)
    d_fem = _smin(_smin(_smin(d_mc, d_lc, 3.0), d_blk, 6.0), d_shaft, 8.0)
    d_groove = np.sqrt(m * m + (a - 29 * s) ** 2) - 12 * s  # trochlear groove: the patella rides in it
    d_fem = np.maximum(d_fem, -d_groove)
    del d_mc, d_lc, d_blk, d_shaft, d_groove
    # Cartilage: a shell of nominal thickness on the condyles and the trochlea.
    notch = (np.abs(m) < 8 * s) & (a < 6 * s)  # the intercondylar notch carries no cartilage
    condylar = (u < cz + 2 * s) & (np.abs(m) < 30 * s) & ~notch  # not on the epicondylar side walls
    trochlear = (a > 8 * s) & (u < zfb + 48 * s) & (np.abs(m) < 26 * s)
    tf_here = (
        tf - d.thinning_table()[_femoral_region(m, a, _analytic_landmarks(d))]
        if d.thinning
        else np.float32(tf)
    )
    fem_cart = (d_fem > 0) & (d_fem <= tf_here) & (condylar | trochlear)
    del notch, condylar, trochlear, tf_here
    film[fem_sl] |= d_fem < tf + 1.0
    return fem_sl, {"fem_cart": fem_cart, "fem": d_fem <= 0, "fem_inner": d_fem > -1.0}


# Posterior tibial slope; also keeps sheets from aligning with a grid.
_TIBIAL_SLOPE = math.tan(math.radians(7.0))


def _tibial_top(m: F32, a: F32, d: _Layout) -> tuple[F32, F32]:
    """Tibial bone surface height and local cartilage thickness (switching within the eminence)."""
    s = d.s
    t_tib = d.tl + (d.tm - d.tl) * _sigmoid(m)
    eminence = (5 * s) * np.exp(-((m / (4.5 * s)) ** 2) - ((a + 2 * s) / (12 * s)) ** 2)
    return -(d.gap + t_tib) + _TIBIAL_SLOPE * (a + 7 * s) + eminence, t_tib


def _tibia(slab: _Slab, d: _Layout) -> _Part:
    """Plateau with a posterior slope and the intercondylar eminence, on a tapering elliptic column."""
    s, margin = d.s, d.margin
    tib_sl = slab.crop(
        (-37 * s - margin, -27 * s - margin, -math.inf), (39 * s + margin, 23 * s + margin, 10 * s)
    )
    if tib_sl is None:
        return None, {}
    m, a, u = slab.at(tib_sl)
    z_top, t_tib = _tibial_top(m, a, d)
    taper = 0.45 + 0.55 * _sigmoid((u + (d.gap + t_tib) + 30 * s) / (9 * s))
    d_tib = np.maximum(_ellipse(m - 1 * s, a + 2 * s, 37 * s * taper, 25 * s * taper), u - z_top)
    return tib_sl, {"tib": d_tib <= 0, "tib_inner": d_tib > -1.0}


def _plateau(slab: _Slab, d: _Layout, film: Mask) -> _Part:
    """Tibial cartilage inside compartment ellipses (normalised radius q), menisci on their rims."""
    s, tm, tl = d.s, d.tm, d.tl
    plat_sl = slab.crop((-36 * s, -27 * s, -12.0), (36 * s, 21 * s, 18.0))
    if plat_sl is None:
        return None, {}
    m, a, u = slab.at(plat_sl)
    z_top, t_tib = _tibial_top(m, a, d)
    above = u - z_top  # height above the tibial bone surface
    del z_top
    nm_med, na_med = (m - 19 * s) / (15 * s), (a + 3 * s) / (21 * s)
    nm_lat, na_lat = (m + 19 * s) / (14 * s), (a + 2 * s) / (17 * s)
    q_med = np.sqrt(nm_med**2 + na_med**2)
    q_lat = np.sqrt(nm_lat**2 + na_lat**2)
    on_bone = above > 0
    if d.thinning:
        table = d.thinning_table()
        tm_here = tm - table[_tibial_region(a, _analytic_landmarks(d), medial=True)]
        tl_here = tl - table[_tibial_region(a, _analytic_landmarks(d), medial=False)]
    else:
        tm_here, tl_here = np.float32(tm), np.float32(tl)
    med_tc = on_bone & (above <= tm_here) & (q_med < 0.95)
    lat_tc = on_bone & (above <= tl_here) & (q_lat < 0.95)

    # Menisci: a wedge (height rising from 0 at the inner edge to the rim), C-shaped: open toward the
    # eminence, wider open medially (C) than laterally (nearly O).
    def meniscus(q: F32, cos_in: F32, t: float, half_open_deg: float) -> Mask:
        height = (6 * s) * np.clip((q - 0.5) / 0.5, 0.0, 1.0)
        ring = (q >= 0.5) & (q <= 1.0) & (cos_in < math.cos(math.radians(half_open_deg)))
        return ring & on_bone & (above <= t + height)

    med_men = meniscus(q_med, -nm_med / np.maximum(q_med, 1e-6), tm, 40.0)
    lat_men = meniscus(q_lat, nm_lat / np.maximum(q_lat, 1e-6), tl, 25.0)
    film[plat_sl] |= on_bone & (above < t_tib + 1.5) & ((q_med < 1.05) | (q_lat < 1.05))
    return plat_sl, {"lat_men": lat_men, "med_men": med_men, "lat_tc": lat_tc, "med_tc": med_tc}


def _patella(slab: _Slab, d: _Layout, film: Mask) -> _Part:
    """In front of the trochlea, its cartilage facing it across a thin fluid film."""
    s, tp, margin, a_pat, u_pat = d.s, d.tp, d.margin, d.a_pat, d.u_pat
    pat_sl = slab.box((-3 * s, a_pat, u_pat), (21 * s + margin, 10 * s + margin, 22 * s + margin))
    if pat_sl is None:
        return None, {}
    m, a, u = slab.at(pat_sl)
    d_pat = _ellipsoid(m + 3 * s, a - a_pat, u - u_pat, 21 * s, 10 * s, 22 * s)
    tp_here = (
        tp - d.thinning_table()[_patellar_region(m, _analytic_landmarks(d))] if d.thinning else np.float32(tp)
    )
    pat_cart = (d_pat > 0) & (d_pat <= tp_here) & (a < a_pat - 2 * s) & (np.abs(u - u_pat) < 17 * s)
    film[pat_sl] |= d_pat < tp + 1.0
    return pat_sl, {"pat_cart": pat_cart, "pat": d_pat <= 0, "pat_inner": d_pat > -1.0}


# ------------------------------------------------------------------------------------------------------------
# Cartilage subregions, from the phantom's own geometry (independent of worker/subregions.py, which finds the
# same landmarks in a label map without knowing the anatomy). The rule, in local coordinates:
#
# * femoral: medial | lateral at the notch's centre (m = 0: the notch is |m| < 8s); anterior in front of the
#   trochlear notch (the most posterior femoral cartilage within the notch, |m| < 8s); weight-bearing from
#   there back over WEIGHT_BEARING_FRACTION of the distance to the condyle's most posterior cartilage;
#   posterior behind;
# * tibial: thirds of each plateau's extent along a;
# * patellar: medial | lateral at the patella's midline (m = -3s; its sheet is symmetric about it).
#
# The landmarks come from the truth labels' exact local coordinates (:func:`label_landmarks`), so that they are
# those of the sampled sheets, whose ends lie up to a voxel inside the analytic ones on a coarse grid. The
# follow-up thinning is applied while sampling, before labels exist, with the analytic landmarks
# (:func:`_analytic_landmarks`); the two differ by less than a voxel.

#: Share of the notch → posterior-end distance that is weight-bearing (pymskt, Eckstein/Wirth cMF/cLF).
WEIGHT_BEARING_FRACTION = 0.6


@dataclass(frozen=True)
class Landmarks:
    """Where the subregion boundaries lie, local mm: see the rule above."""

    trochlear_notch_a: float
    medial_posterior_a: float
    lateral_posterior_a: float
    medial_plateau_a: tuple[float, float]  # (posterior end, anterior end)
    lateral_plateau_a: tuple[float, float]
    patella_midline_m: float


def _analytic_landmarks(d: _Layout) -> Landmarks:
    s = d.s
    # Ellipsoid poles of the condyles (exact for _ellipsoid at the axis extremes) plus the sheet there;
    # plateau cartilage fills its compartment ellipse out to q = 0.95.
    return Landmarks(
        trochlear_notch_a=6 * s,
        medial_posterior_a=-(8 * s + 30 * s) - (d.tf - d.thinned("femoral_medial_posterior")),
        lateral_posterior_a=-(6 * s + 29 * s) - (d.tf - d.thinned("femoral_lateral_posterior")),
        medial_plateau_a=(-3 * s - 0.95 * 21 * s, -3 * s + 0.95 * 21 * s),
        lateral_plateau_a=(-2 * s - 0.95 * 17 * s, -2 * s + 0.95 * 17 * s),
        patella_midline_m=-3 * s,
    )


def label_landmarks(labels: NDArray[np.uint8], m: F32, a: F32, knee: KneeParams) -> Landmarks:
    """The landmarks of the sampled cartilage (*labels* at local *m*, *a*); analytic where a sheet is absent."""
    d = _Layout.of(knee)
    analytic = _analytic_landmarks(d)

    def lowest(sel: Mask, default: float) -> float:
        return float(a[sel].min()) if sel.any() else default

    def extent(sel: Mask, default: tuple[float, float]) -> tuple[float, float]:
        return (float(a[sel].min()), float(a[sel].max())) if sel.any() else default

    femoral = labels == 4
    return Landmarks(
        trochlear_notch_a=lowest(femoral & (np.abs(m) < 8 * d.s), analytic.trochlear_notch_a),
        medial_posterior_a=lowest(femoral & (m > 0), analytic.medial_posterior_a),
        lateral_posterior_a=lowest(femoral & (m <= 0), analytic.lateral_posterior_a),
        medial_plateau_a=extent(labels == 5, analytic.medial_plateau_a),
        lateral_plateau_a=extent(labels == 6, analytic.lateral_plateau_a),
        patella_midline_m=analytic.patella_midline_m,
    )


def _region_label(name: str) -> int:
    return REGIONS_BY_NAME[name].label


def _femoral_region(m: F32, a: F32, lm: Landmarks) -> NDArray[np.uint8]:
    medial = m > 0
    notch = lm.trochlear_notch_a
    boundary = np.where(
        medial,
        notch + WEIGHT_BEARING_FRACTION * (lm.medial_posterior_a - notch),
        notch + WEIGHT_BEARING_FRACTION * (lm.lateral_posterior_a - notch),
    )
    central = np.where(
        medial, _region_label("femoral_medial_central"), _region_label("femoral_lateral_central")
    )
    posterior = np.where(
        medial, _region_label("femoral_medial_posterior"), _region_label("femoral_lateral_posterior")
    )
    return np.where(
        a > notch, _region_label("femoral_anterior"), np.where(a >= boundary, central, posterior)
    ).astype(np.uint8)


def _tibial_region(a: F32, lm: Landmarks, *, medial: bool) -> NDArray[np.uint8]:
    lo, hi = lm.medial_plateau_a if medial else lm.lateral_plateau_a
    third = (hi - lo) / 3.0
    side = "medial" if medial else "lateral"
    return np.where(
        a > hi - third,
        _region_label(f"{side}_tibial_anterior"),
        np.where(
            a >= lo + third,
            _region_label(f"{side}_tibial_central"),
            _region_label(f"{side}_tibial_posterior"),
        ),
    ).astype(np.uint8)


def _patellar_region(m: F32, lm: Landmarks) -> NDArray[np.uint8]:
    return np.where(
        m > lm.patella_midline_m, _region_label("patellar_medial"), _region_label("patellar_lateral")
    ).astype(np.uint8)


def subregion_of(labels: NDArray[np.uint8], m: F32, a: F32, lm: Landmarks) -> NDArray[np.uint8]:
    """The subregion label of cartilage voxels with tissue *labels* (4-7) at local (m, a); 0 elsewhere."""
    out = np.zeros(labels.shape, dtype=np.uint8)
    for value in (4, 5, 6, 7):
        sel = labels == value
        if not sel.any():
            continue
        if value == 4:
            out[sel] = _femoral_region(m[sel], a[sel], lm)
        elif value == 7:
            out[sel] = _patellar_region(m[sel], lm)
        else:
            out[sel] = _tibial_region(a[sel], lm, medial=value == 5)
    return out


def sample_subregions(labels: NDArray[np.uint8], grid: Grid, knee: KneeParams) -> NDArray[np.uint8]:
    """The truth subregion map of *labels* sampled on *grid*: the rule above at each cartilage voxel."""
    origin, steps = _local_axes(grid, knee)
    voxels = np.argwhere((labels >= 4) & (labels <= 7))
    local = (origin + voxels @ steps).astype(np.float32)
    tissue = labels[tuple(voxels.T)]
    m, a = local[:, 0], local[:, 1]
    regions = np.zeros(labels.shape, dtype=np.uint8)
    regions[tuple(voxels.T)] = subregion_of(tissue, m, a, label_landmarks(tissue, m, a, knee))
    return regions


def _soft_tissue(slab: _Slab, d: _Layout, labels: NDArray[np.uint8], film: Mask) -> NDArray[np.uint8]:
    """Tissue classes outside the labels: leg outline with subcutaneous fat, muscle, fat pads, tendons, joint
    fluid (the *film* inside the joint capsule, plus the suprapatellar recess)."""
    s, zfb, a_pat, u_pat = d.s, d.zfb, d.a_pat, d.u_pat
    tissue = np.zeros(slab.shape, dtype=np.uint8)
    leg_sl = slab.box((0.0, -2 * s, 0.0), (60 * s, 64 * s, math.inf))
    if leg_sl is not None:
        m, a, _ = slab.at(leg_sl)
        d_leg = _ellipse(m, a + 2 * s, 60 * s, 64 * s)
        view = tissue[leg_sl]
        view[d_leg <= 0] = Tissue.MUSCLE
        view[(d_leg <= 0) & (d_leg > -6 * s)] = Tissue.FAT
        del d_leg
    _fill_ellipsoid(slab, tissue, Tissue.FAT, (0.0, -40 * s, 5 * s), (18 * s, 11 * s, 35 * s))  # popliteal
    _fill_ellipsoid(slab, tissue, Tissue.FAT, (0.0, 30 * s, 6 * s), (17 * s, 7 * s, 11 * s))  # Hoffa's pad
    # Patellar and quadriceps tendons; the cruciate ligaments cross in the notch (ACL from the lateral
    # condyle's inner wall to the front of the eminence, PCL from the medial one to the back of the tibia).
    for p0, p1, radius in (
        ((-3 * s, a_pat + 2 * s, u_pat - 19 * s), (0.0, 16 * s, -36 * s), 3 * s),
        ((-3 * s, a_pat + 2 * s, u_pat + 20 * s), (0.0, a_pat - 4 * s, u_pat + 75 * s), 4 * s),
        ((-7 * s, -14 * s, zfb + 16 * s), (-2 * s, 6 * s, -2 * s), 3.5 * s),
        ((7 * s, -2 * s, zfb + 18 * s), (1 * s, -24 * s, -8 * s), 4 * s),
    ):
        _fill_segment(slab, tissue, Tissue.TENDON, p0, p1, radius)
    fluid = np.zeros(slab.shape, dtype=np.uint8)
    _fill_ellipsoid(slab, fluid, 1, (0.0, 2 * s, 20 * s), (46 * s, 42 * s, 48 * s))  # capsule
    fluid &= film.view(np.uint8)
    _fill_ellipsoid(slab, fluid, 1, (0.0, 17 * s, zfb + 72 * s), (22 * s, 3 * s, 15 * s))  # recess
    tissue[(fluid > 0) & (labels == 0) & (tissue != Tissue.TENDON)] = Tissue.FLUID
    return tissue


def _bone_and_cartilage_classes(
    tissue: NDArray[np.uint8], labels: NDArray[np.uint8], parts: dict[str, _Part]
) -> None:
    """Marrow inside the bones with a dark cortex, cartilage and menisci: the labelled voxels' classes."""
    tissue[(labels >= 1) & (labels <= 3)] = Tissue.MARROW
    for part, value, inner in _CORTEX:
        sl, masks = parts[part]
        if sl is not None:
            view = tissue[sl]
            view[(labels[sl] == value) & masks[inner]] = Tissue.CORTEX
    tissue[(labels >= 4) & (labels <= 7)] = Tissue.CARTILAGE
    tissue[labels >= 8] = Tissue.MENISCUS


def _local_axes(grid: Grid, knee: KneeParams) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Local (m, a, u) as an affine map of voxel indices: origin (3,) and per-index steps (3, 3)."""
    flip = knee.local_to_lps  # diagonal ±1, its own inverse
    origin = flip @ (grid.origin - np.asarray(knee.centre_lps))
    steps = np.stack(
        [
            flip @ grid.row_dir * grid.spacing[0],
            flip @ grid.col_dir * grid.spacing[1],
            flip @ grid.normal * grid.spacing[2],
        ]
    )
    return origin, steps


def local_coordinates(grid: Grid, knee: KneeParams, k0: int, k1: int) -> tuple[F32, F32, F32]:
    """Local (m, a, u) of the voxel centres of slices k0..k1-1, each shaped (nx, ny, k1-k0)."""
    origin, steps = _local_axes(grid, knee)
    nx, ny, _ = grid.shape
    i = np.arange(nx, dtype=np.float32)[:, None, None]
    j = np.arange(ny, dtype=np.float32)[None, :, None]
    k = np.arange(k0, k1, dtype=np.float32)[None, None, :]
    out = []
    for axis in range(3):
        coord = np.float32(origin[axis]) + i * np.float32(steps[0, axis])
        coord = coord + j * np.float32(steps[1, axis])
        out.append(coord + k * np.float32(steps[2, axis]))
    return out[0], out[1], out[2]


def sample_anatomy(grid: Grid, knee: KneeParams) -> Sampled:
    """Evaluate the knee at every voxel centre, slab by slab, on a few threads (numpy releases the GIL)."""
    nx, ny, nz = grid.shape
    labels = np.empty(grid.shape, dtype=np.uint8)
    tissue = np.empty(grid.shape, dtype=np.uint8)
    step = max(1, _CHUNK_VOXELS // (nx * ny))
    slabs = [(k0, min(nz, k0 + step)) for k0 in range(0, nz, step)]
    origin, steps = _local_axes(grid, knee)

    def work(slab: tuple[int, int]) -> None:
        k0, k1 = slab
        m, a, u = local_coordinates(grid, knee, k0, k1)
        block = _Slab(m, a, u, origin + k0 * steps[2], steps)
        labels[:, :, k0:k1], tissue[:, :, k0:k1] = _evaluate(block, knee)

    # At most 4 threads: each slab holds ~20 float32 temporaries (~100 MB at full size).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(len(slabs), cpus, 4))
    if workers == 1:
        for slab in slabs:
            work(slab)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, slabs))
    return Sampled(grid=grid, labels=labels, tissue=tissue, regions=sample_subregions(labels, grid, knee))
