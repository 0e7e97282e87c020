"""MR intensities of the phantom: DESS-like tissue contrast, partial-volume blur, coil bias and Rician noise.

A water-excitation 3D DESS shows synovial fluid brightest, cartilage bright, menisci, tendons and cortical
bone dark; bone marrow is kept intermediate (as specified for these phantoms) and fat fairly dark because
water excitation suppresses it. Every random choice comes from the seed, so pixels repeat byte for byte.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from openmsk.phantom.anatomy import KneeParams, Sampled, Tissue, local_coordinates

# Mean signal per tissue before gain, arbitrary units (fluid = 1000).
TISSUE_SIGNAL: dict[Tissue, float] = {
    Tissue.AIR: 0.0,
    Tissue.MARROW: 330.0,
    Tissue.CORTEX: 60.0,
    Tissue.CARTILAGE: 720.0,
    Tissue.MENISCUS: 80.0,
    Tissue.FLUID: 1000.0,
    Tissue.FAT: 140.0,
    Tissue.MUSCLE: 270.0,
    Tissue.TENDON: 45.0,
}
# Stored value = signal × gain; keeps fluid near 2000–2600 of the 16-bit range, like scanner magnitude images.
GAIN = 2.0
# Rician noise sigma as a fraction of fluid signal, drawn from the seed.
NOISE_RANGE = (0.015, 0.035)
# Bias field: exp of a quadratic in knee-local coordinates normalised by this length (mm).
BIAS_LENGTH_MM = 80.0


def contrast_params(seed: int) -> dict[str, object]:
    """Seed-derived contrast settings: per-tissue signal scale, noise level and bias coefficients."""
    rng = np.random.default_rng([seed, 2])  # stream 2: contrast
    signal = {t: v * float(rng.uniform(0.95, 1.05)) for t, v in TISSUE_SIGNAL.items()}
    noise_sigma = float(rng.uniform(*NOISE_RANGE)) * TISSUE_SIGNAL[Tissue.FLUID]
    linear = rng.uniform(-0.15, 0.15, size=3)
    quadratic = rng.uniform(-0.10, 0.10, size=6)  # mm, aa, uu, ma, mu, au
    return {"signal": signal, "noise_sigma": noise_sigma, "bias_linear": linear, "bias_quadratic": quadratic}


def _smooth_axis(img: NDArray[np.float32], axis: int) -> NDArray[np.float32]:
    """[1, 2, 1] / 4 along one axis, edges replicated: a cheap stand-in for the MR point-spread function."""
    if img.shape[axis] < 2:
        return img
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    out = img * np.float32(0.5)
    out[tuple(hi)] += np.float32(0.25) * img[tuple(lo)]
    out[tuple(lo)] += np.float32(0.25) * img[tuple(hi)]
    first = [slice(None)] * 3
    last = [slice(None)] * 3
    first[axis], last[axis] = slice(0, 1), slice(-1, None)
    out[tuple(first)] += np.float32(0.25) * img[tuple(first)]
    out[tuple(last)] += np.float32(0.25) * img[tuple(last)]
    return out


def bias_field(sampled: Sampled, knee: KneeParams, params: dict[str, object]) -> NDArray[np.float32]:
    """Smooth multiplicative field defined in patient space, so every orientation of a knee shares it."""
    grid = sampled.grid
    lin = np.asarray(params["bias_linear"], dtype=np.float32)
    quad = np.asarray(params["bias_quadratic"], dtype=np.float32)
    field = np.empty(grid.shape, dtype=np.float32)
    nz = grid.shape[2]
    step = max(1, 2_000_000 // (grid.shape[0] * grid.shape[1]))
    for k0 in range(0, nz, step):
        k1 = min(nz, k0 + step)
        m, a, u = (c / np.float32(BIAS_LENGTH_MM) for c in local_coordinates(grid, knee, k0, k1))
        expo = lin[0] * m + lin[1] * a + lin[2] * u
        expo += quad[0] * m * m + quad[1] * a * a + quad[2] * u * u
        expo += quad[3] * m * a + quad[4] * m * u + quad[5] * a * u
        field[:, :, k0:k1] = np.exp(np.clip(expo, -0.4, 0.4))  # stay within about ±40 %
    return field


def synthesize(sampled: Sampled, knee: KneeParams) -> NDArray[np.uint16]:
    """Turn tissue classes into a 16-bit magnitude image: signal, blur, bias, Rician noise, gain."""
    params = contrast_params(knee.seed)
    signal: dict[Tissue, float] = params["signal"]  # type: ignore[assignment]
    lut = np.zeros(max(Tissue) + 1, dtype=np.float32)
    for tissue, value in signal.items():
        lut[tissue] = value
    img = lut[sampled.tissue]
    for axis in range(3):
        img = _smooth_axis(img, axis)
    img *= bias_field(sampled, knee, params)

    # Magnitude of complex data with Gaussian noise in both channels is Rician; background becomes Rayleigh.
    rng = np.random.default_rng([knee.seed, 3])  # stream 3: noise
    sigma = np.float32(params["noise_sigma"])
    real = rng.standard_normal(img.shape, dtype=np.float32)
    real *= sigma
    real += img
    del img
    imag = rng.standard_normal(real.shape, dtype=np.float32)
    imag *= sigma
    np.square(real, out=real)
    np.square(imag, out=imag)
    real += imag
    del imag
    np.sqrt(real, out=real)
    real *= np.float32(GAIN)
    np.rint(real, out=real)
    np.clip(real, 0, np.iinfo(np.uint16).max, out=real)
    return real.astype(np.uint16)
