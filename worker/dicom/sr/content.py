"""The content of the knee measurement report: its codes and one TID 1411 measurement group per region.

A group is written for each measured tissue (referencing the tissue SEG) and each measured cartilage subregion
(referencing the region SEG); both are :class:`worker.dicom.seg.content.SegmentKind` rows, so one function
builds either. What a group holds comes from the measurement entry of :mod:`openmsk.regions`, value by value:
a value that is ``None`` (not measurable) is left out, never written as 0, and a region whose status is "not
measurable" gets no group at all.

Codes (all from the DICOM content mapping resource, PS3.16):

* Volume: SCT 118565006 (CID 7469), mm3.
* Thickness: LOINC 59089-3, mm, with the derivations of CID 7464 (Mean SCT 373098007, Median SCT 373099004,
  Standard Deviation SCT 386136009) and the 95th percentile (SCT 371889001).
* Covered bone-interface area: Area, SCT 42798000 (CID 7469 "Generic Intensity and Size Measurements"), mm2.
* T2 relaxation time: T2, DCM 113065 (CID 7469; DCM defines it as the "transverse relaxation time"), ms,
  with the same derivations as thickness.
* Change since the prior visit: a group of its own per region ("Change since <date>: <region>", finding site
  and segment as the region's), holding Thickness / Mean as the difference in mm and in percent (UCUM ``%``):
  a TID 1500 reader lists it like any other group, next to the region's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from openmsk.labels import LATERALITY, CodedTerm

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from worker.dicom.seg.content import SegmentKind

__all__ = [
    "ANALYSIS_NAME",
    "CODE_95TH_PERCENTILE",
    "CODE_AREA",
    "CODE_T2",
    "CODE_THICKNESS",
    "CODE_VOLUME",
    "PROCEDURE",
    "SR_SERIES_NUMBER_OFFSET",
    "STATISTICS",
    "THICKNESS_STATISTICS",
    "change_group",
    "change_identifier",
    "measurement_group",
]

SR_SERIES_NUMBER_OFFSET = 2000  # SR series number = source series number + this (the SEGs use 1000 and 1100)
CODE_VOLUME = CodedTerm("118565006", "Volume")
CODE_THICKNESS = CodedTerm("59089-3", "Thickness", "LN")
CODE_AREA = CodedTerm("42798000", "Area")
CODE_T2 = CodedTerm("113065", "T2", "DCM")
CODE_95TH_PERCENTILE = CodedTerm("371889001", "95th percentile")
# Key in a statistics dict (thickness_mm, t2_ms) -> derivation (CID 7464, plus the 95th percentile).
STATISTICS: dict[str, CodedTerm] = {
    "mean": CodedTerm("373098007", "Mean"),
    "median": CodedTerm("373099004", "Median"),
    "std": CodedTerm("386136009", "Standard Deviation"),
    "p95": CODE_95TH_PERCENTILE,
}
THICKNESS_STATISTICS = STATISTICS  # the name the tissue report has used
PROCEDURE = CodedTerm("363679005", "Imaging procedure")
_TOPOGRAPHICAL_MODIFIER = CodedTerm("106233006", "Topographical modifier")
_UNIT_MM3 = CodedTerm("mm3", "cubic millimeter", "UCUM")
_UNIT_MM2 = CodedTerm("mm2", "square millimeter", "UCUM")
_UNIT_MM = CodedTerm("mm", "millimeter", "UCUM")
_UNIT_MS = CodedTerm("ms", "millisecond", "UCUM")
_UNIT_PERCENT = CodedTerm("%", "percent", "UCUM")
ANALYSIS_NAME = "OpenMSK knee analysis"


def _round(value: float, digits: int) -> float:
    # DS holds 16 characters: round so that the stored text is the value, not a truncation of it.
    return float(round(float(value), digits))


def _number(value: Any) -> float | None:
    """A finite number, or ``None`` for what was not measured (``None``, NaN)."""
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


def _finding_sites(kind: SegmentKind, laterality: str | None) -> list[Any]:
    """The covered bone (or the tissue) with the knee's laterality and every topographical modifier.

    highdicom's FindingSite takes one topographical modifier; a region such as "medial weight-bearing" has two,
    so the others are added as further HAS CONCEPT MOD items of the same finding site (TID 1411 row 5).
    """
    import highdicom as hd

    kwargs: dict[str, Any] = {}
    if laterality is not None:
        kwargs["laterality"] = LATERALITY[laterality].to_code()
    if kind.modifiers:
        kwargs["topographical_modifier"] = kind.modifiers[0].to_code()
    location = kind.anatomic_region or kind.property_type
    site = hd.sr.FindingSite(anatomic_location=location.to_code(), **kwargs)
    for modifier in kind.modifiers[1:]:
        site.ContentSequence.append(
            hd.sr.CodeContentItem(
                name=_TOPOGRAPHICAL_MODIFIER.to_code(),
                value=modifier.to_code(),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        )
    return [site]


def _statistics(name: CodedTerm, unit: CodedTerm, stats: Any, digits: int, algorithm: Any) -> list[Any]:
    import highdicom as hd

    if not isinstance(stats, dict):
        return []
    out = []
    for key, derivation in STATISTICS.items():
        value = _number(stats.get(key))
        if value is not None:
            out.append(
                hd.sr.Measurement(
                    name=name.to_code(),
                    value=_round(value, digits),
                    unit=unit.to_code(),
                    derivation=derivation.to_code(),
                    algorithm_id=algorithm,
                )
            )
    return out


def _referenced_segment(seg: Dataset, segment_number: int, source_series_uid: str) -> Any:
    import highdicom as hd

    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
    )


def measurement_group(
    kind: SegmentKind,
    entry: dict[str, Any],
    seg: Dataset,
    segment_number: int,
    source_series_uid: str,
    laterality: str | None,
    tracking_uid: str,
    model_algorithm: Any,
    analysis_algorithm: Any,
) -> Any | None:
    """The TID 1411 group of one tissue or region's measurement *entry*; ``None`` when nothing was measured."""
    import highdicom as hd

    def single(code: CodedTerm, unit: CodedTerm, value: Any) -> list[Any]:
        number = _number(value)
        if number is None:  # not measured: no value at all, never 0
            return []
        return [
            hd.sr.Measurement(
                name=code.to_code(),
                value=_round(number, 3),
                unit=unit.to_code(),
                algorithm_id=analysis_algorithm,
            )
        ]

    measurements = single(CODE_VOLUME, _UNIT_MM3, entry.get("volume_mm3"))
    measurements += _statistics(CODE_THICKNESS, _UNIT_MM, entry.get("thickness_mm"), 4, analysis_algorithm)
    measurements += single(CODE_AREA, _UNIT_MM2, entry.get("interface_area_mm2"))
    measurements += _statistics(CODE_T2, _UNIT_MS, entry.get("t2_ms"), 3, analysis_algorithm)
    if not measurements:
        return None
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=kind.display_name),
        referenced_segment=_referenced_segment(seg, segment_number, source_series_uid),
        finding_type=kind.property_type.to_code(),
        finding_category=kind.category.to_code(),
        finding_sites=_finding_sites(kind, laterality),
        algorithm_id=model_algorithm,
        measurements=measurements,
    )


def change_identifier(kind: SegmentKind, prior_date: str) -> str:
    """The tracking identifier (TEXT) of a change group: ``Change since 2025-01-31: <region>``."""
    return f"Change since {prior_date}: {kind.display_name}"


def change_group(
    kind: SegmentKind,
    change: dict[str, Any],
    prior_date: str,
    seg: Dataset,
    segment_number: int,
    source_series_uid: str,
    laterality: str | None,
    tracking_uid: str,
    analysis_algorithm: Any,
) -> Any | None:
    """The group of a region's change since the prior visit (mean thickness: mm and %); ``None`` if neither."""
    import highdicom as hd

    mean = STATISTICS["mean"].to_code()
    measurements = []
    for key, unit, digits in (("thickness_mean_mm", _UNIT_MM, 4), ("percent", _UNIT_PERCENT, 2)):
        value = _number(change.get(key))
        if value is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=CODE_THICKNESS.to_code(),
                    value=_round(value, digits),
                    unit=unit.to_code(),
                    derivation=mean,
                    algorithm_id=analysis_algorithm,
                )
            )
    if not measurements:
        return None
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=change_identifier(kind, prior_date)
        ),
        referenced_segment=_referenced_segment(seg, segment_number, source_series_uid),
        finding_type=kind.property_type.to_code(),
        finding_category=kind.category.to_code(),
        finding_sites=_finding_sites(kind, laterality),
        measurements=measurements,
    )
