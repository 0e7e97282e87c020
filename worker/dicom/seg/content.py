"""What a knee SEG says about each segment: codes, colours, labels, and the series it sorts into.

Two tables are written as SEGs: the tissues (:mod:`openmsk.labels`, label map 1-9) and the cartilage
subregions (:mod:`openmsk.regions`, label map 11-32). Both become :class:`SegmentKind` rows, so one writer and
one segment description serve both. A region is coded as its cartilage (same category and property type, so a
viewer groups it with the tissue SEG's cartilage) on the covered bone, told apart by its anatomic region
modifiers (the cartilage's medial/lateral compartment plus the region's anterior/central/posterior/medial/
lateral qualifiers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from openmsk.labels import LATERALITY, TISSUES, CodedTerm
from openmsk.regions import REGIONS

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "CONTENT_LABEL",
    "REGION_CONTENT_LABEL",
    "REGION_KINDS",
    "REGION_SEG_SERIES_NUMBER_OFFSET",
    "SEG_SERIES_NUMBER_OFFSET",
    "TISSUE_KINDS",
    "SegmentKind",
    "segment_description",
    "segment_numbers",
]

CONTENT_LABEL = "KNEE_SEG"  # CS: upper case, at most 16 characters
REGION_CONTENT_LABEL = "KNEE_REGIONS"
# SEG series number = source series number + this offset, so that it sorts after the source in a viewer and is
# the same on every rerun. The region SEG sorts right after the tissue SEG, before the SR (2000).
SEG_SERIES_NUMBER_OFFSET = 1000
REGION_SEG_SERIES_NUMBER_OFFSET = 1100


@dataclass(frozen=True)
class SegmentKind:
    """One row of a segment table: what a label value of a label map is, in DICOM terms.

    ``name`` is the key in the measurements (tissue or region name); ``modifiers`` go into the anatomic
    region's AnatomicRegionModifierSequence (CID 2 qualifiers), in order, without repeats.
    """

    label: int
    name: str
    display_name: str
    category: CodedTerm
    property_type: CodedTerm
    anatomic_region: CodedTerm | None
    modifiers: tuple[CodedTerm, ...]
    rgb: tuple[int, int, int]

    def __post_init__(self) -> None:
        if self.modifiers and self.anatomic_region is None:
            raise ValueError(f"{self.name}: anatomic region modifiers need an anatomic region")


def _tissue_kinds() -> Mapping[int, SegmentKind]:
    return MappingProxyType(
        {
            t.label: SegmentKind(
                t.label,
                t.name,
                t.display_name,
                t.category,
                t.property_type,
                t.anatomic_region,
                (t.region_modifier,) if t.region_modifier is not None else (),
                t.rgb,
            )
            for t in TISSUES.values()
        }
    )


def _region_kinds() -> Mapping[int, SegmentKind]:
    kinds = {}
    for r in REGIONS.values():
        parent = r.parent
        modifiers = [parent.region_modifier] if parent.region_modifier is not None else []
        modifiers += [m for m in r.modifiers if m not in modifiers]
        kinds[r.label] = SegmentKind(
            r.label,
            r.name,
            r.display_name,
            parent.category,
            parent.property_type,
            parent.anatomic_region,
            tuple(modifiers),
            r.rgb,
        )
    return MappingProxyType(kinds)


#: label value -> segment kind, for the tissue label map and for the region label map
TISSUE_KINDS: Mapping[int, SegmentKind] = _tissue_kinds()
REGION_KINDS: Mapping[int, SegmentKind] = _region_kinds()


def segment_description(
    number: int,
    kind: SegmentKind,
    algorithm: Any,
    laterality: str | None,
) -> Any:
    """A highdicom ``SegmentDescription`` for *kind* (a tissue or a region) as segment *number*.

    Medial/lateral and the region's qualifiers go into the anatomic region's modifiers (CID 2) and the knee's
    right/left into the property type's modifier (CID 244); highdicom has no arguments for either, so they are
    added to its items here.
    """
    import highdicom as hd
    from highdicom.sr import CodedConcept

    regions = [kind.anatomic_region.to_code()] if kind.anatomic_region is not None else None
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=kind.display_name,
        segmented_property_category=kind.category.to_code(),
        segmented_property_type=kind.property_type.to_code(),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=regions,
        display_color=hd.color.CIELabColor.from_rgb(*kind.rgb),
    )
    if kind.modifiers:
        desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
            CodedConcept.from_code(m.to_code()) for m in kind.modifiers
        ]
    if laterality is not None:
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            CodedConcept.from_code(LATERALITY[laterality].to_code())
        ]
    return desc


def segment_numbers(seg: Dataset) -> dict[str, int]:
    """Tissue or region name -> segment number of a SEG written by ``write_seg`` (matched by segment label)."""
    by_display = {k.display_name: k.name for k in (*TISSUE_KINDS.values(), *REGION_KINDS.values())}
    out: dict[str, int] = {}
    for item in seg.SegmentSequence:
        name = by_display.get(str(item.SegmentLabel))
        if name is not None:
            out[name] = int(item.SegmentNumber)
    return out
