"""Multi-echo phantoms for quantitative T2: a qDESS series (two echoes) and a multi-echo spin-echo series.

Both are built on the anatomy of :func:`openmsk.phantom.generate` (same labels, grid, UIDs of study and frame
of reference), with a known T2, T1 and proton density per tissue (:data:`TISSUE_RELAXATION`):

- **qDESS** (Sveinsson et al., MRM 2017): echo 1 (S+) is the phantom's DESS image (its contrast, blur and
  bias, so the demo segmentation model still sees the contrast it was trained on); echo 2 (S-) is echo 1
  times the S-/S+ ratio that the analytic two-echo model predicts for the voxel's tissue (T2, T1, TR, TE, flip
  angle, spoiler area and duration, diffusivity), i.e. the forward direction of the formula the worker
  inverts. Header: RepetitionTime, EchoTime, FlipAngle on both echoes and GE's private spoiler tags
  (0019,10B6) gradient area and (0019,10B7) duration (microseconds), which anonymisers often strip.
- **MESE**: echo *n* = proton-density image (the DESS image again, as amplitude) times exp(-TE_n / T2).

Then Rician noise at a stated SNR: sigma = mean echo-1 cartilage signal / SNR, added to the real and imaginary
channel of every echo independently. Both echoes (all echoes) are one series, told apart by EchoNumbers and
EchoTime as scanners write them. truth.json gains ``t2_ms`` (per tissue) and the acquisition parameters.

This is the standard model the analyses assume, not a Bloch simulation: it checks that the node inverts the
published model correctly, not the model itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from openmsk.labels import TISSUES

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from pydicom.dataset import Dataset

    from openmsk.phantom import Phantom

__all__ = [
    "KINDS",
    "MESE_ECHO_TIMES_MS",
    "QDESS",
    "TISSUE_RELAXATION",
    "EchoPhantom",
    "QdessAcquisition",
    "generate_echoes",
    "qdess_ratio",
    "write_echo_series",
]

KINDS = ("qdess", "mese")
EchoKind = Literal["qdess", "mese"]


@dataclass(frozen=True)
class Relaxation:
    """Relaxation of one tissue at 3 T (ms); proton density is relative (fluid-free cartilage = 1)."""

    t2_ms: float
    t1_ms: float


# Published 3 T ranges (cartilage T2 30-45 ms, menisci 10-20 ms); T1 as the qDESS model assumes it
# (femoral cartilage 1200 ms, other cartilage and menisci 1000 ms), so a phantom tests the inversion only.
TISSUE_RELAXATION: dict[str, Relaxation] = {
    "femur": Relaxation(45.0, 1000.0),
    "tibia": Relaxation(45.0, 1000.0),
    "patella": Relaxation(45.0, 1000.0),
    "femoral_cartilage": Relaxation(38.0, 1200.0),
    "medial_tibial_cartilage": Relaxation(33.0, 1000.0),
    "lateral_tibial_cartilage": Relaxation(31.0, 1000.0),
    "patellar_cartilage": Relaxation(42.0, 1000.0),
    "medial_meniscus": Relaxation(16.0, 1000.0),
    "lateral_meniscus": Relaxation(15.0, 1000.0),
}
BACKGROUND = Relaxation(60.0, 1000.0)  # label 0: fluid, fat, muscle — not measured


@dataclass(frozen=True)
class QdessAcquisition:
    """The qDESS parameters written to the header (times in ms, spoiler duration in microseconds)."""

    repetition_time_ms: float = 18.0
    echo_time_ms: float = 5.0
    flip_angle_deg: float = 20.0
    gl_area: float = 3132.0  # GE (0019,10B6), gradient area
    tg_us: float = 1560.0  # GE (0019,10B7), spoiler duration
    diffusivity_m2_s: float = 1.25e-9


QDESS = QdessAcquisition()
MESE_ECHO_TIMES_MS = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0)


def qdess_ratio(t2_ms: float, t1_ms: float, acq: QdessAcquisition = QDESS) -> float:
    """|S-/S+| the analytic two-echo model predicts for a tissue (the forward form of Sveinsson's formula)."""
    tr, te, t1, tg = acq.repetition_time_ms / 1e3, acq.echo_time_ms / 1e3, t1_ms / 1e3, acq.tg_us / 1e6
    alpha = math.radians(acq.flip_angle_deg)
    gl = acq.gl_area / (tg * 1e6) * 100
    dkl = 4258 * 2 * math.pi * gl * tg
    diffusion = dkl**2 * acq.diffusivity_m2_s
    e = math.exp(-tr / t1 - tr * diffusion)
    k = math.sin(alpha / 2) ** 2 * (1 + e) / (1 - math.cos(alpha) * e)
    c1 = (tr - tg / 3) * diffusion
    # T2 = -2000 (TR - TE) / (ln(r / k) + c1), solved for r.
    return k * math.exp(-2000 * (tr - te) / t2_ms - c1)


@dataclass(frozen=True)
class EchoPhantom:
    """A multi-echo phantom: the anatomy phantom, its echoes (n_echoes, nx, ny, nz) and the echo times."""

    kind: EchoKind
    base: Phantom
    echoes: NDArray[np.float32]
    echo_times_ms: tuple[float, ...]
    snr: float
    t2_truth_ms: dict[str, float]
    parameters: dict[str, float]


def _tissue_maps(labels: NDArray[np.uint8]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    import numpy as np

    t2 = np.full(256, BACKGROUND.t2_ms, np.float32)
    t1 = np.full(256, BACKGROUND.t1_ms, np.float32)
    for label, tissue in TISSUES.items():
        relax = TISSUE_RELAXATION[tissue.name]
        t2[label], t1[label] = relax.t2_ms, relax.t1_ms
    return t2[labels], t1[labels]


def generate_echoes(
    kind: EchoKind,
    seed: int = 0,
    size: str = "small",
    orientation: str = "sagittal",
    laterality: str = "R",
    *,
    snr: float = 40.0,
    thinning: dict[str, float] | None = None,
) -> EchoPhantom:
    """A qDESS or MESE phantom; the same arguments give the same pixels and UIDs.

    *thinning* makes it a follow-up visit, as :func:`openmsk.phantom.generate` does (same patient, new study
    and series UIDs, cartilage thinner in the named regions).
    """
    import numpy as np

    from openmsk.phantom import generate

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr!r}")
    base = generate(seed=seed, size=size, orientation=orientation, laterality=laterality, thinning=thinning)
    amplitude = base.image.astype(np.float32)
    t2_map, t1_map = _tissue_maps(base.labels)
    if kind == "qdess":
        ratio_of = np.vectorize(lambda t2, t1: qdess_ratio(float(t2), float(t1)), otypes=[np.float32])
        # A ratio per (T2, T1) pair, not per voxel: only a handful of tissues.
        pairs, inverse = np.unique(np.stack([t2_map.ravel(), t1_map.ravel()]), axis=1, return_inverse=True)
        ratio = ratio_of(pairs[0], pairs[1])[inverse.ravel()].reshape(amplitude.shape)
        clean = np.stack([amplitude, amplitude * ratio])
        times: tuple[float, ...] = (QDESS.echo_time_ms, QDESS.echo_time_ms)
        parameters = {
            "repetition_time_ms": QDESS.repetition_time_ms,
            "echo_time_ms": QDESS.echo_time_ms,
            "flip_angle_deg": QDESS.flip_angle_deg,
            "gl_area": QDESS.gl_area,
            "tg_us": QDESS.tg_us,
        }
    else:
        times = MESE_ECHO_TIMES_MS
        clean = np.stack([amplitude * np.exp(-te / t2_map) for te in times]).astype(np.float32)
        parameters = {"repetition_time_ms": 2700.0, "echo_time_ms": times[0], "flip_angle_deg": 90.0}
    cartilage = np.isin(base.labels, [t.label for t in TISSUES.values() if t.is_cartilage])
    sigma = float(clean[0][cartilage].mean()) / snr
    rng = np.random.default_rng([seed, 40, KINDS.index(kind)])  # stream 40+: echo noise
    real = clean + rng.normal(0.0, sigma, clean.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, clean.shape).astype(np.float32)
    echoes = np.sqrt(real * real + imag * imag).astype(np.float32)
    truth = {tissue.name: TISSUE_RELAXATION[tissue.name].t2_ms for tissue in TISSUES.values()}
    return EchoPhantom(kind, base, echoes, times, float(snr), truth, parameters)


_DESCRIPTION = {"qdess": "3D qDESS", "mese": "MESE T2 MAP"}
_SERIES_NUMBER_OFFSET = {"qdess": 20, "mese": 30}


def write_echo_series(
    phantom: EchoPhantom, out_dir: str | Path, *, spoiler_tags: bool = True
) -> dict[str, Any]:
    """Write ``dicom/`` (one series, every echo), ``labels.nii.gz`` and ``truth.json`` under *out_dir*.

    The slices are written by :func:`openmsk.phantom.dicom.write_dicom_series` (one call per echo, each echo
    its own SOP Instance UIDs), which gives each slice the echo's attributes as it writes it. *spoiler_tags*
    False leaves out GE's private spoiler tags, as an anonymiser would. Returns ``dicom_dir``,
    ``dicom_files``, ``labels``, ``truth``.
    """
    import numpy as np

    from openmsk.phantom import write_series
    from openmsk.phantom.dicom import phantom_uid, write_dicom_series

    out = Path(out_dir)
    base = phantom.base
    meta = base.meta
    # A follow-up visit is a new study: its echo series must not reuse the baseline's UIDs.
    visit = () if not meta.get("visit") else (f"visit{meta['visit']}",)
    series_uid = phantom_uid(
        meta["seed"], meta["laterality"], meta["size"], meta["orientation"], phantom.kind, *visit
    )
    paths = write_series(base, out)  # labels.nii.gz and truth.json of the anatomy; dicom/ replaced below
    for old in paths["dicom_files"]:
        old.unlink()
    nz = base.image.shape[2]
    scale = 4000.0 / max(float(np.percentile(phantom.echoes[0], 99.9)), 1e-6)  # fill the 16-bit range
    files: list[Path] = []
    for e, echo in enumerate(phantom.echoes):
        sops = [phantom_uid(series_uid, "sop", e, k) for k in range(nz)]
        echo_meta = {
            **meta,
            "uids": {**meta["uids"], "series": series_uid, "sop_instances": sops},
            "series_description": f"{_DESCRIPTION[phantom.kind]} {meta['orientation'][:3].upper()}",
            "series_number": meta["series_number"] + _SERIES_NUMBER_OFFSET[phantom.kind],
        }
        pixels = np.clip(np.rint(echo * scale), 0, 65535).astype(np.uint16)
        echo_phantom = dataclasses.replace(base, image=pixels, meta=echo_meta)
        folder = out / "dicom" / f"echo{e + 1}"

        def amend(ds: Dataset, k: int, e: int = e) -> None:
            ds.EchoNumbers = str(e + 1)
            ds.EchoTime = f"{phantom.echo_times_ms[e]:g}"
            ds.RepetitionTime = f"{phantom.parameters['repetition_time_ms']:g}"
            ds.FlipAngle = f"{phantom.parameters['flip_angle_deg']:g}"
            ds.EchoTrainLength = len(phantom.echoes)
            ds.InstanceNumber = e * nz + k + 1
            if phantom.kind == "mese":
                ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", ["SK"], "2D"
                ds.SequenceName = "se_mc2d7"
            elif spoiler_tags:
                ds.add_new(0x00190010, "LO", "GEMS_ACQU_01")
                ds.add_new(0x001910B6, "DS", f"{phantom.parameters['gl_area']:g}")
                ds.add_new(0x001910B7, "DS", f"{phantom.parameters['tg_us']:g}")

        files.extend(write_dicom_series(echo_phantom, folder, amend))
    truth = json.loads(Path(paths["truth"]).read_text())
    truth["t2_ms"] = dict(phantom.t2_truth_ms)
    truth["echoes"] = {
        "kind": phantom.kind,
        "snr": phantom.snr,
        "echo_times_ms": list(phantom.echo_times_ms),
        "parameters": dict(phantom.parameters),
        "t1_ms": {name: r.t1_ms for name, r in TISSUE_RELAXATION.items()},
        "series_uid": series_uid,
    }
    Path(paths["truth"]).write_text(json.dumps(truth, indent=2) + "\n")
    return {**paths, "dicom_files": files}
