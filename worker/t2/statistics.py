"""T2 statistics per tissue and per region, in the measurement entry shape of :mod:`openmsk.regions`.

Any label map works: the tissue map (1-9, :data:`openmsk.labels.TISSUES`) or a subregion map (11-32,
:data:`openmsk.regions.REGIONS`), so the subregion analysis's map plugs in as it is. Statistics use only the
voxels with a T2 value; a tissue (region) with none gets ``t2_ms: None`` (null, never 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from openmsk.labels import TISSUES
from openmsk.regions import REGIONS

__all__ = ["T2_TISSUES", "merge_t2", "region_names", "t2_statistics", "tissue_names"]

#: The tissues T2 is reported for: the cartilages and the menisci (bone and fluid T2 mean nothing here).
T2_TISSUES = tuple(t.label for t in TISSUES.values() if t.is_cartilage or "meniscus" in t.name)


def tissue_names() -> dict[int, str]:
    """Label -> tissue name for :data:`T2_TISSUES`."""
    return {label: TISSUES[label].name for label in T2_TISSUES}


def region_names() -> dict[int, str]:
    """Label -> region name for every subregion of :data:`openmsk.regions.REGIONS`."""
    return {label: r.name for label, r in REGIONS.items()}


def t2_statistics(
    t2_ms: NDArray[np.floating], labels: NDArray[np.integer], names: Mapping[int, str]
) -> dict[str, dict[str, Any] | None]:
    """``{name: {mean, median, std, p95, voxels} | None}`` for each label in *names* present in *labels*.

    A label absent from *labels* is left out (not analysed); present but without a T2 value -> ``None``.
    """
    if t2_ms.shape != labels.shape:
        raise ValueError(f"T2 map shape {t2_ms.shape} differs from the labels' {labels.shape}")
    inside = labels > 0
    values, owners = t2_ms[inside], labels[inside]  # only the labelled voxels: a small fraction of a knee
    out: dict[str, dict[str, Any] | None] = {}
    for label, name in names.items():
        here = owners == label
        if not here.any():
            continue
        v = values[here]
        v = v[v > 0].astype(np.float64)
        if v.size == 0:
            out[name] = None
            continue
        out[name] = {
            "mean": float(v.mean()),
            "median": float(np.median(v)),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "p95": float(np.percentile(v, 95)),
            "voxels": int(v.size),
        }
    return out


def merge_t2(
    measurements: dict[str, Any],
    tissues: Mapping[str, dict[str, Any] | None],
    regions: Mapping[str, dict[str, Any] | None] | None = None,
    method: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Put T2 statistics into *measurements* (in place, and returned): ``tissues[name]["t2_ms"]``,
    ``regions[name]["t2_ms"]`` (entries created where the region analysis made none) and ``method["t2"]``."""
    for name, stats in tissues.items():
        measurements.setdefault("tissues", {}).setdefault(name, {})["t2_ms"] = stats
    for name, stats in (regions or {}).items():
        measurements.setdefault("regions", {}).setdefault(name, {})["t2_ms"] = stats
    if method is not None:
        measurements.setdefault("method", {})["t2"] = dict(method)
    measurements.setdefault("units", {})["t2_ms"] = "ms"
    return measurements
