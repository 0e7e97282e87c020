"""The acquisition parameters a T2 model needs, read from the header, else from the rule or model entry.

qDESS needs RepetitionTime, EchoTime, FlipAngle and the spoiler gradient's area and duration. GE writes the
spoiler in private tags (0019,10B6) gradient area and (0019,10B7) duration in microseconds (DOSMA reads the
same tags); anonymisation often strips them, so they may come from the routing rule or the model entry
(``overrides``: ``repetition_time_ms``, ``echo_time_ms``, ``flip_angle_deg``, ``gl_area``, ``tg_us``). MESE
needs the echo times only. What is missing is a :class:`ParametersMissing` that names the DICOM attributes.

The qDESS model also needs T1, which one scan does not measure: :data:`ASSUMED_T1_MS` per tissue (DOSMA's
values), stated in the report's method.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.tag import Tag

__all__ = [
    "ASSUMED_T1_MS",
    "DEFAULT_T1_MS",
    "DIFFUSIVITY_M2_S",
    "GE_GRADIENT_AREA",
    "GE_SPOILER_DURATION",
    "MeseParameters",
    "ParametersMissing",
    "QdessParameters",
    "mese_parameters",
    "qdess_parameters",
]

GE_GRADIENT_AREA = Tag(0x0019, 0x10B6)
GE_SPOILER_DURATION = Tag(0x0019, 0x10B7)
#: Assumed T1 (ms) per tissue name for the qDESS model; every other voxel gets :data:`DEFAULT_T1_MS`.
ASSUMED_T1_MS: Mapping[str, float] = {"femoral_cartilage": 1200.0}
DEFAULT_T1_MS = 1000.0
DIFFUSIVITY_M2_S = 1.25e-9  # free water-like diffusivity in cartilage, as DOSMA assumes


class ParametersMissing(ValueError):
    """The header (and the overrides) lack what the model needs; ``missing`` names the DICOM attributes."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        super().__init__(f"T2 needs {', '.join(self.missing)}, which the series header does not give")


@dataclass(frozen=True)
class QdessParameters:
    """qDESS acquisition: TR, TE (ms), flip angle (degrees), spoiler area and duration (microseconds)."""

    repetition_time_ms: float
    echo_time_ms: float
    flip_angle_deg: float
    gl_area: float
    tg_us: float
    diffusivity_m2_s: float = DIFFUSIVITY_M2_S

    def __post_init__(self) -> None:
        for name in ("repetition_time_ms", "flip_angle_deg", "gl_area", "tg_us"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not 0 < self.echo_time_ms < self.repetition_time_ms:
            raise ValueError(
                f"echo time {self.echo_time_ms} ms must lie in (0, TR = {self.repetition_time_ms})"
            )


@dataclass(frozen=True)
class MeseParameters:
    """Multi-echo spin echo: the echo times (ms), increasing."""

    echo_times_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        times = self.echo_times_ms
        if len(times) < 3 or not all(math.isfinite(t) and t > 0 for t in times):
            raise ValueError(f"MESE needs at least 3 positive echo times, got {times!r}")
        if any(b <= a for a, b in itertools.pairwise(times)):
            raise ValueError(f"echo times must increase, got {times!r}")


def _number(ds: Dataset, key: str | Tag) -> float | None:
    element = ds.get(key)
    value = getattr(element, "value", element) if not isinstance(key, str) else element
    if value is None or value == "":
        return None
    if isinstance(value, bytes):  # a private tag read without its dictionary: VR UN
        value = value.decode("ascii", "replace").strip("\0 ")
    try:
        number = float(value if isinstance(value, (int, float, str)) else value[0])
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


_QDESS_FIELDS = (
    ("repetition_time_ms", "RepetitionTime", "RepetitionTime"),
    ("echo_time_ms", "EchoTime", "EchoTime"),
    ("flip_angle_deg", "FlipAngle", "FlipAngle"),
    ("gl_area", GE_GRADIENT_AREA, "spoiler gradient area (0019,10B6)"),
    ("tg_us", GE_SPOILER_DURATION, "spoiler duration (0019,10B7)"),
)


def qdess_parameters(source: Dataset, overrides: Mapping[str, float] | None = None) -> QdessParameters:
    """The qDESS parameters from echo 1's header (*source*), each missing one from *overrides*.

    Raises
    ------
    ParametersMissing
        Naming every attribute neither gives.
    """
    overrides = overrides or {}
    values: dict[str, float] = {}
    missing: list[str] = []
    for name, key, label in _QDESS_FIELDS:
        value = _number(source, key)
        if value is None and name in overrides:
            value = float(overrides[name])
        if value is None:
            missing.append(label)
        else:
            values[name] = value
    if missing:
        raise ParametersMissing(missing)
    return QdessParameters(**values)


def mese_parameters(echo_times_ms: Sequence[float]) -> MeseParameters:
    """The MESE parameters from the echoes' EchoTime values.

    Raises
    ------
    ParametersMissing
        When an echo has no EchoTime.
    """
    if any(not math.isfinite(t) for t in echo_times_ms):
        raise ParametersMissing(["EchoTime"])
    return MeseParameters(tuple(float(t) for t in echo_times_ms))
