"""The one tissue table of OpenMSK: label numbers, names, codes, colours and cartilage/bone pairs.

Everything that names or draws a tissue reads this table: the segmenters' label maps, the phantom truth,
the DICOM-SEG segment descriptions (codes and RecommendedDisplayCIELabValue), the SR measurement groups, the
report and the preview overlay. Keeping it in one place is what makes the colour of "Femoral cartilage" in the
PNG the colour a viewer shows for the same segment of the SEG, and the SR's finding codes those of the SEG.

Coding follows DICOM PS3.16 for segmentations: the category comes from CID 7150 (Segmentation Property
Categories), the property type from CID 7151 (Segmentation Property Types) / CID 7166 (Common Tissue
Segmentation Types), the anatomic region from CID 4 (with the bone a cartilage sheet covers as its region),
and the medial or lateral compartment is an anatomic region modifier from CID 2. The knee's laterality (right
or left) is not part of the table: it belongs to each series, and the writers add it as a CID 244 modifier.

This module imports nothing but the standard library, so the web and the SCP can use it without pydicom.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom.sr.coding import Code

__all__ = [
    "BY_NAME",
    "CARTILAGES",
    "CATEGORY_ANATOMICAL_STRUCTURE",
    "CATEGORY_TISSUE",
    "LATERALITY",
    "TISSUES",
    "CodedTerm",
    "Tissue",
    "tissue",
    "tissues_present",
]


@dataclass(frozen=True)
class CodedTerm:
    """A coded concept (code value, coding scheme, code meaning), stored without importing pydicom.

    Parameters
    ----------
    value: str
        Code value, e.g. ``"71341001"``.
    meaning: str
        Code meaning, e.g. ``"Femur"``.
    scheme: str
        Coding scheme designator, ``"SCT"`` (SNOMED CT) unless stated.
    """

    value: str
    meaning: str
    scheme: str = "SCT"

    def __post_init__(self) -> None:
        for field in ("value", "meaning", "scheme"):
            text = getattr(self, field)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"CodedTerm.{field} must be a non-empty string, got {text!r}")
        # SH (code value) and LO (meaning) limits of the Code Sequence Macro.
        if len(self.value) > 16:
            raise ValueError(f"code value {self.value!r} is longer than 16 characters")
        if len(self.meaning) > 64:
            raise ValueError(f"code meaning {self.meaning!r} is longer than 64 characters")

    def to_code(self) -> Code:
        """The same concept as a :class:`pydicom.sr.coding.Code` (highdicom accepts these everywhere)."""
        from pydicom.sr.coding import Code

        return Code(self.value, self.scheme, self.meaning)


# CID 7150 Segmentation Property Categories. "Anatomical Structure" is SCT 91723000 since the 2019 revision of
# the DICOM standard (older writers used SCT 123037004 "Body structure" for the same category).
CATEGORY_TISSUE = CodedTerm("85756007", "Tissue")
CATEGORY_ANATOMICAL_STRUCTURE = CodedTerm("91723000", "Anatomical Structure")

_FEMUR = CodedTerm("71341001", "Femur")
_TIBIA = CodedTerm("12611008", "Tibia")
_PATELLA = CodedTerm("64234005", "Patella")
_CARTILAGE = CodedTerm("309312004", "Cartilage")
_MENISCUS = CodedTerm("74135004", "Meniscus")
_KNEE_JOINT = CodedTerm("49076000", "Knee joint")
_MEDIAL = CodedTerm("255561001", "Medial")
_LATERAL = CodedTerm("49370004", "Lateral")

# CID 244 Laterality, keyed by the DICOM Laterality / ImageLaterality value of the source series.
LATERALITY: Mapping[str, CodedTerm] = MappingProxyType(
    {"R": CodedTerm("24028007", "Right"), "L": CodedTerm("7771000", "Left")}
)


@dataclass(frozen=True)
class Tissue:
    """One labelled tissue of the knee.

    Parameters
    ----------
    label: int
        Canonical label value in OpenMSK label maps (1–255).
    name: str
        Machine name (``snake_case``), used as key in reports, truth files and job records.
    display_name: str
        Human name, used as SEG segment label, report row and preview legend (at most 64 characters).
    category: CodedTerm
        Segmented property category (CID 7150).
    property_type: CodedTerm
        Segmented property type (CID 7151).
    anatomic_region: CodedTerm | None
        Where the tissue lies (CID 4): the covered bone for cartilage, the knee joint for menisci.
    region_modifier: CodedTerm | None
        Medial or lateral compartment (CID 2), where the tissue is one of a pair within the knee.
    rgb: tuple[int, int, int]
        sRGB display colour, 0–255 per channel; chosen to be distinct from each other and from grey.
    bone: int | None
        For cartilage, the label of the bone whose surface it covers (thickness is measured from that
        surface); ``None`` for everything else.
    """

    label: int
    name: str
    display_name: str
    category: CodedTerm
    property_type: CodedTerm
    anatomic_region: CodedTerm | None
    region_modifier: CodedTerm | None
    rgb: tuple[int, int, int]
    bone: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.label, int) or isinstance(self.label, bool) or not 1 <= self.label <= 255:
            raise ValueError(f"label must be an integer in 1..255, got {self.label!r}")
        if not self.name or not self.name.replace("_", "").isalnum() or self.name != self.name.lower():
            raise ValueError(f"name must be snake_case, got {self.name!r}")
        if not self.display_name or len(self.display_name) > 64:
            raise ValueError(f"display_name must have 1..64 characters, got {self.display_name!r}")
        if len(self.rgb) != 3 or any(not isinstance(c, int) or not 0 <= c <= 255 for c in self.rgb):
            raise ValueError(f"rgb must be three integers in 0..255, got {self.rgb!r}")
        if self.region_modifier is not None and self.anatomic_region is None:
            raise ValueError("a region modifier needs an anatomic region")

    @property
    def is_cartilage(self) -> bool:
        """Whether thickness is measured for this tissue (it is a cartilage sheet on a bone)."""
        return self.bone is not None

    @property
    def rgb_float(self) -> tuple[float, float, float]:
        """The display colour with channels in 0–1 (as plotting libraries want them)."""
        r, g, b = self.rgb
        return (r / 255.0, g / 255.0, b / 255.0)


def _table(*tissues: Tissue) -> Mapping[int, Tissue]:
    by_label: dict[int, Tissue] = {}
    for t in tissues:
        if t.label in by_label:
            raise ValueError(f"label {t.label} defined twice")
        by_label[t.label] = t
    names = [t.name for t in tissues]
    if len(set(names)) != len(names):
        raise ValueError("tissue names must be unique")
    for t in tissues:
        if t.bone is not None and (t.bone not in by_label or by_label[t.bone].is_cartilage):
            raise ValueError(f"{t.name}: bone {t.bone} is not a bone of the table")
    return MappingProxyType(dict(sorted(by_label.items())))


# Colours: saturated hues spread around the hue circle (so none reads as grey under a 40 % overlay), bones in
# mid tones and the small structures (cartilage, menisci) in the most vivid ones; every pair is at least
# ΔE*ab 30 apart (tests/test_seg_sr.py checks it).
TISSUES: Mapping[int, Tissue] = _table(
    Tissue(
        label=1,
        name="femur",
        display_name="Femur",
        category=CATEGORY_ANATOMICAL_STRUCTURE,
        property_type=_FEMUR,
        anatomic_region=_KNEE_JOINT,
        region_modifier=None,
        rgb=(230, 159, 0),
    ),
    Tissue(
        label=2,
        name="tibia",
        display_name="Tibia",
        category=CATEGORY_ANATOMICAL_STRUCTURE,
        property_type=_TIBIA,
        anatomic_region=_KNEE_JOINT,
        region_modifier=None,
        rgb=(86, 180, 233),
    ),
    Tissue(
        label=3,
        name="patella",
        display_name="Patella",
        category=CATEGORY_ANATOMICAL_STRUCTURE,
        property_type=_PATELLA,
        anatomic_region=_KNEE_JOINT,
        region_modifier=None,
        rgb=(204, 121, 167),
    ),
    Tissue(
        label=4,
        name="femoral_cartilage",
        display_name="Femoral cartilage",
        category=CATEGORY_TISSUE,
        property_type=_CARTILAGE,
        anatomic_region=_FEMUR,
        region_modifier=None,
        rgb=(0, 200, 120),
        bone=1,
    ),
    Tissue(
        label=5,
        name="medial_tibial_cartilage",
        display_name="Medial tibial cartilage",
        category=CATEGORY_TISSUE,
        property_type=_CARTILAGE,
        anatomic_region=_TIBIA,
        region_modifier=_MEDIAL,
        rgb=(255, 235, 40),
        bone=2,
    ),
    Tissue(
        label=6,
        name="lateral_tibial_cartilage",
        display_name="Lateral tibial cartilage",
        category=CATEGORY_TISSUE,
        property_type=_CARTILAGE,
        anatomic_region=_TIBIA,
        region_modifier=_LATERAL,
        rgb=(230, 30, 40),
        bone=2,
    ),
    Tissue(
        label=7,
        name="patellar_cartilage",
        display_name="Patellar cartilage",
        category=CATEGORY_TISSUE,
        property_type=_CARTILAGE,
        anatomic_region=_PATELLA,
        region_modifier=None,
        rgb=(40, 80, 255),
        bone=3,
    ),
    Tissue(
        label=8,
        name="medial_meniscus",
        display_name="Medial meniscus",
        category=CATEGORY_TISSUE,
        property_type=_MENISCUS,
        anatomic_region=_KNEE_JOINT,
        region_modifier=_MEDIAL,
        rgb=(255, 0, 255),
    ),
    Tissue(
        label=9,
        name="lateral_meniscus",
        display_name="Lateral meniscus",
        category=CATEGORY_TISSUE,
        property_type=_MENISCUS,
        anatomic_region=_KNEE_JOINT,
        region_modifier=_LATERAL,
        rgb=(150, 255, 80),
    ),
)

BY_NAME: Mapping[str, Tissue] = MappingProxyType({t.name: t for t in TISSUES.values()})
CARTILAGES: tuple[Tissue, ...] = tuple(t for t in TISSUES.values() if t.is_cartilage)
#: the bones (the tissues cartilage covers), in label order
BONES: tuple[Tissue, ...] = tuple(TISSUES[label] for label in sorted({t.bone for t in CARTILAGES if t.bone}))


def tissue(key: int | str) -> Tissue:
    """The tissue with label value or name *key*; ``KeyError`` names the valid keys otherwise."""
    try:
        return TISSUES[key] if isinstance(key, int) else BY_NAME[key]
    except KeyError:
        raise KeyError(f"unknown tissue {key!r}; known: {sorted(BY_NAME)}") from None


def tissues_present(labels: Any) -> list[Tissue]:
    """The tissues whose label occurs in the label array *labels* (a NumPy array), in label order.

    One compare per tissue: several times cheaper than np.bincount, which widens every voxel to 64 bits.
    """
    return [t for value, t in TISSUES.items() if (labels == value).any()]
