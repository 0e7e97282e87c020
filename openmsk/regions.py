"""The one table of cartilage subregions, and the one shape of a region's measurements in reports.

Two kinds of region are measured: the tissues of :mod:`openmsk.labels` (label map 1-9) and the cartilage
subregions below (a second label map, 11-32). Both are reported with the same measurement entry
(:data:`MEASUREMENT_KEYS`): volume, thickness statistics, covered bone-interface area and T2 statistics, each
present only where it was measured, plus a ``status`` of ``"measured"`` or ``"not measurable"`` with the
``reason``. A value that could not be measured is ``null``, never 0. The thickness/subregion analysis and the
T2 analysis both write into this one shape, so report.json, report.csv, the SR and the job page read one
schema, whatever analyses ran.

Labels follow the original service where it had them (femoral cartilage 11-15: anterior, medial and lateral
weight-bearing, medial and lateral posterior); tibial plateaus get anterior / central / posterior thirds
(21-26) and the patellar cartilage its medial and lateral facet (31-32). Codes: the region's tissue keeps its
SEG codes (:mod:`openmsk.labels`), and the subregion adds anatomic region modifiers from SNOMED CT
(CID 2 / CID 244-like qualifiers): Anterior, Central (the weight-bearing zone, as in the Eckstein/Wirth
"central" femoral subregions), Posterior, Medial, Lateral.

Like :mod:`openmsk.labels` this imports only the standard library, so the web can read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from openmsk.labels import TISSUES, CodedTerm, Tissue

__all__ = [
    "MEASURED",
    "MEASUREMENT_KEYS",
    "NOT_MEASURABLE",
    "REGIONS",
    "REGIONS_BY_NAME",
    "Region",
    "region",
    "regions_of",
]

MEASURED = "measured"
NOT_MEASURABLE = "not measurable"
#: The keys a region's (or a tissue's) measurement entry may hold in report.json; absent = not analysed.
#: ``thickness_mm`` and ``t2_ms`` are dicts of statistics (mean, median, std, p95; T2 adds ``voxels``).
MEASUREMENT_KEYS = (
    "volume_mm3",
    "thickness_mm",
    "interface_area_mm2",
    "t2_ms",
    "status",
    "reason",
)

ANTERIOR = CodedTerm("255549009", "Anterior")
CENTRAL = CodedTerm("26216008", "Central")
POSTERIOR = CodedTerm("255551008", "Posterior")
MEDIAL = CodedTerm("255561001", "Medial")
LATERAL = CodedTerm("49370004", "Lateral")


@dataclass(frozen=True)
class Region:
    """One cartilage subregion.

    Parameters
    ----------
    label: int
        Value in the subregion label map (11-255; 1-9 are the tissues).
    name: str
        Machine name (``snake_case``), the key in report.json, truth.json and the job record.
    display_name: str
        Human name (SEG segment label, report row, job page), at most 64 characters.
    tissue: int
        Label of the cartilage (:data:`openmsk.labels.TISSUES`) this region is part of.
    modifiers: tuple[CodedTerm, ...]
        Anatomic region modifiers that tell it apart from the other regions of its tissue (SR finding site
        modifiers, SEG anatomic region modifiers).
    rgb: tuple[int, int, int]
        Display colour.
    """

    label: int
    name: str
    display_name: str
    tissue: int
    modifiers: tuple[CodedTerm, ...]
    rgb: tuple[int, int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.label, int) or not 11 <= self.label <= 255:
            raise ValueError(f"region label must be an integer in 11..255, got {self.label!r}")
        if self.tissue not in TISSUES or not TISSUES[self.tissue].is_cartilage:
            raise ValueError(f"{self.name}: tissue {self.tissue} is not a cartilage of the tissue table")
        if not self.name or self.name != self.name.lower() or not self.name.replace("_", "").isalnum():
            raise ValueError(f"region name must be snake_case, got {self.name!r}")
        if not self.display_name or len(self.display_name) > 64:
            raise ValueError(f"display_name must have 1..64 characters, got {self.display_name!r}")
        if not self.modifiers:
            raise ValueError(f"{self.name}: a region needs at least one modifier")

    @property
    def parent(self) -> Tissue:
        """The cartilage this region belongs to."""
        return TISSUES[self.tissue]


def _table(*regions: Region) -> Mapping[int, Region]:
    labels = [r.label for r in regions]
    names = [r.name for r in regions]
    if len(set(labels)) != len(labels) or len(set(names)) != len(names):
        raise ValueError("region labels and names must be unique")
    if set(names) & {t.name for t in TISSUES.values()}:
        raise ValueError("region names must differ from tissue names")
    return MappingProxyType({r.label: r for r in sorted(regions, key=lambda r: r.label)})


REGIONS: Mapping[int, Region] = _table(
    # Femoral cartilage (label 4), the original service's 11-15.
    Region(11, "femoral_anterior", "Femoral cartilage, anterior (trochlea)", 4, (ANTERIOR,), (120, 220, 160)),
    Region(
        12,
        "femoral_medial_central",
        "Femoral cartilage, medial weight-bearing",
        4,
        (MEDIAL, CENTRAL),
        (0, 150, 90),
    ),
    Region(
        13,
        "femoral_lateral_central",
        "Femoral cartilage, lateral weight-bearing",
        4,
        (LATERAL, CENTRAL),
        (0, 230, 200),
    ),
    Region(
        14,
        "femoral_medial_posterior",
        "Femoral cartilage, medial posterior",
        4,
        (MEDIAL, POSTERIOR),
        (40, 110, 60),
    ),
    Region(
        15,
        "femoral_lateral_posterior",
        "Femoral cartilage, lateral posterior",
        4,
        (LATERAL, POSTERIOR),
        (90, 200, 255),
    ),
    # Tibial plateaus (labels 5 and 6): anterior / central / posterior thirds.
    Region(
        21, "medial_tibial_anterior", "Medial tibial cartilage, anterior", 5, (ANTERIOR,), (255, 245, 140)
    ),
    Region(22, "medial_tibial_central", "Medial tibial cartilage, central", 5, (CENTRAL,), (230, 200, 0)),
    Region(
        23, "medial_tibial_posterior", "Medial tibial cartilage, posterior", 5, (POSTERIOR,), (170, 140, 0)
    ),
    Region(
        24, "lateral_tibial_anterior", "Lateral tibial cartilage, anterior", 6, (ANTERIOR,), (255, 130, 130)
    ),
    Region(25, "lateral_tibial_central", "Lateral tibial cartilage, central", 6, (CENTRAL,), (200, 20, 30)),
    Region(
        26, "lateral_tibial_posterior", "Lateral tibial cartilage, posterior", 6, (POSTERIOR,), (130, 0, 20)
    ),
    # Patellar cartilage (label 7): medial and lateral facet.
    Region(31, "patellar_medial", "Patellar cartilage, medial facet", 7, (MEDIAL,), (110, 140, 255)),
    Region(32, "patellar_lateral", "Patellar cartilage, lateral facet", 7, (LATERAL,), (20, 40, 170)),
)

REGIONS_BY_NAME: Mapping[str, Region] = MappingProxyType({r.name: r for r in REGIONS.values()})


def region(key: int | str) -> Region:
    """The region with label value or name *key*; ``KeyError`` names the valid keys otherwise."""
    try:
        return REGIONS[key] if isinstance(key, int) else REGIONS_BY_NAME[key]
    except KeyError:
        raise KeyError(f"unknown region {key!r}; known: {sorted(REGIONS_BY_NAME)}") from None


def regions_of(tissue_label: int) -> tuple[Region, ...]:
    """The subregions of the cartilage with label *tissue_label*, in label order (empty for other tissues)."""
    return tuple(r for r in REGIONS.values() if r.tissue == tissue_label)
