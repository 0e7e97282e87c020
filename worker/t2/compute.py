"""T2 of a loaded multi-echo series: the model for its kind, the parameters from its header, the map.

``compute_t2`` is the one entry the pipeline calls after the segmentation: qDESS through the analytic
two-echo model with the assumed T1 of each voxel's segmented tissue, MESE through the mono-exponential fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from openmsk.labels import TISSUES
from worker.t2.echoes import MultiEchoVolume
from worker.t2.mese import MIN_R2, mese_t2
from worker.t2.parameters import (
    ASSUMED_T1_MS,
    DEFAULT_T1_MS,
    DIFFUSIVITY_M2_S,
    mese_parameters,
    qdess_parameters,
)
from worker.t2.qdess import T2_BOUNDS_MS, qdess_t2
from worker.t2.statistics import T2_TISSUES

__all__ = ["T2_MODEL_VERSION", "T2Map", "compute_t2"]

#: Takes part in the parametric map's UIDs: a changed model is a new object, not a replacement.
T2_MODEL_VERSION = "1"


@dataclass(frozen=True)
class T2Map:
    """A computed T2 map (ms, float32, 0 = no value) on the volume's grid, and how it was computed."""

    t2_ms: NDArray[np.float32]
    model: str  # "qdess" or "mese"
    method: dict[str, Any] = field(default_factory=dict)  # what report.json's method["t2"] states


def compute_t2(
    volume: MultiEchoVolume,
    labels: NDArray[np.integer],
    *,
    overrides: Mapping[str, float] | None = None,
    skip_first_echo: bool = False,
) -> T2Map:
    """The T2 map of *volume* with *labels* (the segmentation, on the same grid) choosing T1 for qDESS.

    Raises
    ------
    worker.t2.parameters.ParametersMissing
        When the header (and *overrides*) lack a parameter; it names the attribute.
    """
    if volume.kind == "qdess":
        params = qdess_parameters(volume.echo_sources[0][0], overrides)
        t1_by_label = {label: ASSUMED_T1_MS.get(t.name, DEFAULT_T1_MS) for label, t in TISSUES.items()}
        t2 = qdess_t2(volume.echoes[0], volume.echoes[1], params, labels=labels, t1_by_label=t1_by_label)
        method = {
            "model": "qDESS analytic two-echo model (Sveinsson et al., MRM 2017), as DOSMA implements it",
            "repetition_time_ms": params.repetition_time_ms,
            "echo_time_ms": params.echo_time_ms,
            "flip_angle_deg": params.flip_angle_deg,
            "spoiler_gradient_area": params.gl_area,
            "spoiler_duration_us": params.tg_us,
            "diffusivity_m2_s": DIFFUSIVITY_M2_S,
            "assumed_t1_ms": {**dict(ASSUMED_T1_MS), "other tissue": DEFAULT_T1_MS},
            "bounds_ms": list(T2_BOUNDS_MS),
            "segmented_image": "root-sum-of-squares of the two echoes",
        }
        return T2Map(t2, "qdess", method)
    params_mese = mese_parameters(volume.echo_times_ms)
    # Fitted in the tissues T2 is reported for: the whole knee would take a minute at full size.
    mask = np.isin(labels, T2_TISSUES)
    fit = mese_t2(volume.echoes, params_mese.echo_times_ms, skip_first_echo=skip_first_echo, mask=mask)
    method = {
        "model": "mono-exponential fit per voxel (weighted log-linear start, Gauss-Newton refinement)",
        "echo_times_ms": list(params_mese.echo_times_ms),
        "first_echo_skipped": skip_first_echo,
        "min_r2": MIN_R2,
        "bounds_ms": [0.0, 100.0],
        "segmented_image": "echo 1",
        "fitted_voxels": "segmented cartilage and menisci",
    }
    return T2Map(fit.t2_ms, "mese", method)
