"""qDESS T2: the analytic two-echo model (Sveinsson et al., MRM 2017), as DOSMA implements it.

With times in s and the flip angle in rad: Gl = GlArea / (Tg 1e6) 100, dkL = gamma Gl Tg (gamma = 4258 * 2 pi),
E = exp(-TR/T1 - TR dkL^2 D), k = sin^2(alpha/2) (1 + E) / (1 - cos(alpha) E), c1 = (TR - Tg/3) dkL^2 D and
T2 [ms] = -2000 (TR - TE) / (ln(|S2/S1| / k) + c1). Only k depends on the voxel's tissue (through T1), so the
map is computed once with the default T1 and then corrected in the voxels of tissues with another assumed T1
(one subtraction in log space): a few passes over float32, no per-voxel Python.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from worker.t2.parameters import DEFAULT_T1_MS, QdessParameters

__all__ = ["T2_BOUNDS_MS", "qdess_constants", "qdess_t2"]

#: Kept range (ms), exclusive: outside it a voxel has no T2 (0 in the map), as DOSMA keeps (0, 100).
T2_BOUNDS_MS = (0.0, 100.0)


def qdess_constants(params: QdessParameters, t1_ms: float) -> tuple[float, float]:
    """(ln k, c1) of the model for one T1."""
    tr, t1, tg = params.repetition_time_ms / 1e3, t1_ms / 1e3, params.tg_us / 1e6
    alpha = math.radians(params.flip_angle_deg)
    gl = params.gl_area / (tg * 1e6) * 100
    dkl = 4258 * 2 * math.pi * gl * tg
    diffusion = dkl**2 * params.diffusivity_m2_s
    e = math.exp(-tr / t1 - tr * diffusion)
    k = math.sin(alpha / 2) ** 2 * (1 + e) / (1 - math.cos(alpha) * e)
    return math.log(k), (tr - tg / 3) * diffusion


def qdess_t2(
    s1: NDArray[np.floating],
    s2: NDArray[np.floating],
    params: QdessParameters,
    *,
    labels: NDArray[np.integer] | None = None,
    t1_by_label: Mapping[int, float] | None = None,
    bounds_ms: tuple[float, float] = T2_BOUNDS_MS,
) -> NDArray[np.float32]:
    """The T2 map (ms, float32, 0 where there is no value) from echo 1 (*s1*) and echo 2 (*s2*).

    T1 is :data:`~worker.t2.parameters.DEFAULT_T1_MS` except in the voxels whose *labels* value has an entry
    in *t1_by_label*. Voxels where either echo is 0, or T2 falls outside *bounds_ms*, get 0.
    """
    if s1.shape != s2.shape:
        raise ValueError(f"echo shapes differ: {s1.shape} vs {s2.shape}")
    if labels is not None and labels.shape != s1.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the echoes' {s1.shape}")
    scale = np.float32(-2000.0 * (params.repetition_time_ms - params.echo_time_ms) / 1e3)
    log_k, c1 = qdess_constants(params, DEFAULT_T1_MS)
    with np.errstate(divide="ignore", invalid="ignore"):
        # denominator = ln|S2| - ln|S1| - ln k + c1, built in place in one float32 buffer
        denominator = np.abs(s2, dtype=np.float32)
        np.log(denominator, out=denominator)
        other = np.abs(s1, dtype=np.float32)
        np.log(other, out=other)
        denominator -= other
        del other
        denominator += np.float32(c1 - log_k)
        if labels is not None and t1_by_label:
            for label, t1 in t1_by_label.items():
                if t1 == DEFAULT_T1_MS:
                    continue
                log_k_t, c1_t = qdess_constants(params, t1)
                voxels = labels == label
                denominator[voxels] += np.float32((c1_t - c1) - (log_k_t - log_k))
        t2 = np.divide(scale, denominator, out=denominator)
    low, high = bounds_ms
    t2[~((t2 > low) & (t2 < high))] = 0.0  # NaN and inf (an echo of 0) fail the comparison too
    return t2
