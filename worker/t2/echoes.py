"""Split a multi-echo series by echo and load it: the image to segment plus the stack of echoes.

Scanners write the echoes of a qDESS (two: S+ and S-) or multi-echo spin-echo series (3-16) as one series, the
instances of echo *n* sharing EchoNumbers *n* (EchoTime where EchoNumbers is missing or the same for all).
Every echo must cover the same slices, else the echoes do not describe the same voxels and T2 is meaningless:
that is a clear :class:`~worker.errors.SeriesError`. A series with one echo loads exactly as before
(:func:`worker.volume.load_series`), a plain :class:`~worker.volume.SeriesVolume`: no T2, no error.

Which image is segmented: for qDESS the root-sum-of-squares of the two echoes (as DOSMA segments qDESS: more
signal than S+ alone, the contrast of a DESS), for MESE the first echo (the most signal, proton-density-like).
The returned volume's ``sources`` are the first echo's instances, so the SEG references them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from worker.errors import SeriesError
from worker.volume import SeriesVolume, load_series

__all__ = ["MAX_ECHOES", "EchoKind", "MultiEchoVolume", "echo_groups", "load_series_with_echoes"]

MAX_ECHOES = 16
EchoKind = Literal["qdess", "mese"]
# Positions agree to this (mm): headers round to ~6 significant digits.
POSITION_TOL_MM = 1e-3


@dataclass
class MultiEchoVolume(SeriesVolume):
    """A :class:`SeriesVolume` (the image to segment, echo 1's sources) with the echoes it came from.

    ``echoes`` is (n_echoes, i, j, k) float32 on the volume's grid; ``echo_sources[e]`` are echo *e*'s
    instances in slice order; ``kind`` says which T2 model applies.
    """

    echoes: np.ndarray = field(repr=False, default_factory=lambda: np.empty((0, 0, 0, 0), np.float32))
    echo_times_ms: tuple[float, ...] = ()
    echo_sources: list[list[Dataset]] = field(repr=False, default_factory=list)
    kind: EchoKind = "mese"


def _echo_key(ds: Dataset, by: str) -> float:
    value = ds.get(by)
    if value is None or value == "":
        return float("nan")
    if by == "EchoNumbers" and not isinstance(value, (int, float, str)):
        value = value[0]  # multi-valued IS: an instance of several echoes is not split further
    return float(value)


def echo_groups(datasets: Sequence[Dataset]) -> list[list[Dataset]]:
    """The instances of each echo, in echo order (by EchoNumbers, else by EchoTime); one group = one echo."""
    for by in ("EchoNumbers", "EchoTime"):
        keys = [_echo_key(ds, by) for ds in datasets]
        if any(np.isnan(k) for k in keys):
            continue
        distinct = sorted(set(keys))
        if len(distinct) > 1:
            return [[ds for ds, k in zip(datasets, keys, strict=True) if k == key] for key in distinct]
    return [list(datasets)]


def _kind(sources: Sequence[Dataset], n_echoes: int) -> EchoKind | None:
    sequence = " ".join(str(v).upper() for v in np.atleast_1d(sources[0].get("ScanningSequence", "")))
    if n_echoes == 2 and "GR" in sequence:
        return "qdess"
    if 3 <= n_echoes <= MAX_ECHOES:
        return "mese"
    return None  # e.g. a dual-echo PD/T2 spin echo: two points, no goodness of fit


def load_series_with_echoes(datasets: Sequence[Dataset]) -> SeriesVolume:
    """Load one series; a multi-echo one becomes a :class:`MultiEchoVolume` (see the module docstring).

    Raises
    ------
    SeriesError
        When the echoes do not cover the same slice positions (or sizes), or a multi-echo series has a number
        of echoes no T2 model applies to.
    """
    groups = echo_groups(datasets)
    if len(groups) == 1:
        return load_series(datasets)
    volumes = [load_series(group) for group in groups]
    first = volumes[0]
    kind = _kind(first.sources, len(volumes))
    if kind is None:
        raise SeriesError(
            f"the series has {len(volumes)} echoes: neither a two-echo qDESS (gradient echo) nor a 3-"
            f"{MAX_ECHOES} echo spin-echo series",
            "Send one echo, a qDESS or a multi-echo spin-echo series.",
        )
    reference = np.array([ds.ImagePositionPatient for ds in first.sources], float)
    for number, volume in enumerate(volumes[1:], start=2):
        positions = np.array([ds.ImagePositionPatient for ds in volume.sources], float)
        same = volume.image.shape == first.image.shape and positions.shape == reference.shape
        if not same or np.max(np.abs(positions - reference)) > POSITION_TOL_MM:
            raise SeriesError(
                f"echo {number} does not have the same slice positions as echo 1 "
                f"({volume.image.shape[2]} vs {first.image.shape[2]} slices, or shifted)",
                "The echoes of a multi-echo series must cover the same slices; send the complete series.",
            )
        if np.max(np.abs(volume.affine_lps - first.affine_lps)) > POSITION_TOL_MM:
            raise SeriesError(f"echo {number} has another orientation or pixel spacing than echo 1")
    # Stacked in the loaded slices' memory order ((k, j, i) per echo) and viewed as (e, i, j, k): a stack in
    # (i, j, k) order would stride through all of memory, as volume.py explains for the slices.
    echoes = np.stack([np.asarray(v.image, dtype=np.float32).transpose(2, 1, 0) for v in volumes])
    echoes = echoes.transpose(0, 3, 2, 1)
    rss = kind == "qdess"
    image = np.sqrt(np.einsum("e...,e...->...", echoes, echoes, dtype=np.float32)) if rss else echoes[0]
    times = tuple(float(v.sources[0].get("EchoTime", "nan") or "nan") for v in volumes)
    return MultiEchoVolume(
        image=image,
        affine_lps=first.affine_lps,
        spacing=first.spacing,
        sources=first.sources,
        echoes=echoes,
        echo_times_ms=times,
        echo_sources=[v.sources for v in volumes],
        kind=kind,
    )
