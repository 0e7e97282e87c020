"""What the knee SEG says about each segment: codes, colours, labels, and the series it sorts into."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from openmsk.labels import LATERALITY, TISSUES, Tissue

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["CONTENT_LABEL", "SEG_SERIES_NUMBER_OFFSET", "segment_description", "segment_numbers"]

CONTENT_LABEL = "KNEE_SEG"  # CS: upper case, at most 16 characters
# SEG series number = source series number + this offset, so that it sorts after the source in a viewer and is
# the same on every rerun.
SEG_SERIES_NUMBER_OFFSET = 1000


def segment_description(
    number: int,
    tissue: Tissue,
    algorithm: Any,
    laterality: str | None,
) -> Any:
    """A highdicom ``SegmentDescription`` for *tissue* as segment *number*.

    Medial/lateral goes into the anatomic region's modifier (CID 2) and the knee's right/left into the
    property type's modifier (CID 244); highdicom has no arguments for either, so they are added to its items
    here.
    """
    import highdicom as hd
    from highdicom.sr import CodedConcept

    regions = [tissue.anatomic_region.to_code()] if tissue.anatomic_region is not None else None
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=tissue.display_name,
        segmented_property_category=tissue.category.to_code(),
        segmented_property_type=tissue.property_type.to_code(),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=regions,
        display_color=hd.color.CIELabColor.from_rgb(*tissue.rgb),
    )
    if tissue.region_modifier is not None:
        desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
            CodedConcept.from_code(tissue.region_modifier.to_code())
        ]
    if laterality is not None:
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            CodedConcept.from_code(LATERALITY[laterality].to_code())
        ]
    return desc


def segment_numbers(seg: Dataset) -> dict[str, int]:
    """Tissue name -> segment number of a SEG written by :func:`write_seg` (matched by segment label)."""
    by_display = {t.display_name: t.name for t in TISSUES.values()}
    out: dict[str, int] = {}
    for item in seg.SegmentSequence:
        name = by_display.get(str(item.SegmentLabel))
        if name is not None:
            out[name] = int(item.SegmentNumber)
    return out
