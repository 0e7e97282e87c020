"""Multi-echo spin-echo T2: a mono-exponential S = A exp(-TE / T2) fitted per voxel, vectorised.

A log-linear least-squares fit (weighted by S^2, which undoes the log's amplification of noise at low signal)
gives the start; a few Gauss-Newton steps of the non-linear least-squares problem in (A, R2 = 1/T2) finish it,
each step the closed-form solution of a 2x2 system per voxel, so the whole fit is array arithmetic over
(echoes, voxels). The first echo can be left out (stimulated echoes make it too low). A voxel keeps its T2
when the fit explains the data (r^2 >= 0.9) and T2 lies in (0, 100) ms, as DOSMA masks; else 0.
Only voxels with signal are fitted (echo 1 above ``signal_floor`` x its 99th percentile): air has no T2; and,
given a ``mask`` (the pipeline gives the segmented cartilage and menisci), only those: a whole knee at
384 x 384 x 160 is ~14 M voxels with signal (over a minute on one core), its cartilage and menisci ~2 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["MIN_R2", "MeseFit", "mese_t2"]

MIN_R2 = 0.9
GAUSS_NEWTON_STEPS = 4


@dataclass(frozen=True)
class MeseFit:
    """The T2 map (ms, 0 = no value), the fit's r^2 (NaN where not fitted) and the voxels kept."""

    t2_ms: NDArray[np.float32]
    r2: NDArray[np.float32]
    valid: NDArray[np.bool_]


def mese_t2(
    echoes: NDArray[np.floating],
    echo_times_ms: Sequence[float],
    *,
    skip_first_echo: bool = False,
    min_r2: float = MIN_R2,
    bounds_ms: tuple[float, float] = (0.0, 100.0),
    signal_floor: float = 0.05,
    mask: NDArray[np.bool_] | None = None,
) -> MeseFit:
    """Fit the voxels of *echoes* ((n_echoes, ...) magnitude images) at *echo_times_ms* (within *mask*)."""
    echoes = np.asarray(echoes)
    if mask is not None and mask.shape != echoes.shape[1:]:
        raise ValueError(f"mask shape {mask.shape} differs from the echoes' {echoes.shape[1:]}")
    # Loaded echoes are a transposed view of (echo, k, j, i) slices: work in that memory order (a boolean
    # gather across strides is several times slower) and hand the maps back transposed.
    reverse = (0, *range(echoes.ndim - 1, 0, -1))
    if echoes.ndim > 2 and echoes.transpose(reverse).flags.c_contiguous:
        fit = mese_t2(
            echoes.transpose(reverse),
            echo_times_ms,
            skip_first_echo=skip_first_echo,
            min_r2=min_r2,
            bounds_ms=bounds_ms,
            signal_floor=signal_floor,
            mask=None if mask is None else mask.T,
        )
        return MeseFit(fit.t2_ms.T, fit.r2.T, fit.valid.T)
    times = np.asarray(echo_times_ms, dtype=np.float32)
    if echoes.shape[0] != times.size:
        raise ValueError(f"{echoes.shape[0]} echoes but {times.size} echo times")
    if skip_first_echo:
        echoes, times = echoes[1:], times[1:]
    if times.size < 3:
        raise ValueError("a mono-exponential fit with a goodness of fit needs at least 3 echoes")
    shape = echoes.shape[1:]
    first = echoes[0]
    floor = signal_floor * float(np.percentile(first[:: max(1, first.shape[0] // 32)], 99))
    fitted = first > floor
    if mask is not None:
        fitted &= mask
    s = echoes[:, fitted].astype(np.float32)  # (n, m): only voxels with signal
    np.maximum(s, np.float32(1e-3), out=s)
    t = times[:, None]

    # Weighted log-linear start: ln S = ln A - R2 TE with weights S^2.
    w = s * s
    y = np.log(s)
    sw, swt, swtt = w.sum(0), (w * t).sum(0), (w * t * t).sum(0)
    swy, swty = (w * y).sum(0), (w * t * y).sum(0)
    det = sw * swtt - swt * swt
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (sw * swty - swt * swy) / det
        r2_rate = np.clip(-slope, 1e-4, 1.0)  # 1/ms: T2 between 1 ms and 10 s to start
        amplitude = np.exp((swy - slope * swt) / sw)
    del w, y

    # Gauss-Newton on S = A exp(-R TE): J = [e, -A TE e]; solve (J^T J) d = J^T r per voxel.
    for _ in range(GAUSS_NEWTON_STEPS):
        e = np.exp(-t * r2_rate)
        model = amplitude * e
        residual = s - model
        te_e = t * e
        a11 = (e * e).sum(0)
        a12 = -(amplitude * (e * te_e).sum(0))
        a22 = amplitude * amplitude * (te_e * te_e).sum(0)
        b1 = (e * residual).sum(0)
        b2 = -(amplitude * (te_e * residual).sum(0))
        det = a11 * a22 - a12 * a12
        with np.errstate(divide="ignore", invalid="ignore"):
            d_amp = (a22 * b1 - a12 * b2) / det
            d_rate = (a11 * b2 - a12 * b1) / det
        ok = np.isfinite(d_amp) & np.isfinite(d_rate)
        amplitude = np.where(ok, amplitude + d_amp, amplitude)
        r2_rate = np.where(ok, np.clip(r2_rate + d_rate, 1e-5, 10.0), r2_rate)

    model = amplitude * np.exp(-t * r2_rate)
    ss_res = ((s - model) ** 2).sum(0)
    ss_tot = ((s - s.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - ss_res / ss_tot
        t2 = 1.0 / r2_rate
    keep = (r2 >= min_r2) & (t2 > bounds_ms[0]) & (t2 < bounds_ms[1]) & np.isfinite(t2)
    t2_map = np.zeros(shape, np.float32)
    r2_map = np.full(shape, np.nan, np.float32)
    valid = np.zeros(shape, bool)
    t2_map[fitted] = np.where(keep, t2, 0.0)
    r2_map[fitted] = r2
    valid[fitted] = keep
    return MeseFit(t2_map, r2_map, valid)
