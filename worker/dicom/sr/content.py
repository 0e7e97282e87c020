"""The content of the knee measurement report: its codes and one TID 1411 measurement group per tissue."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from openmsk.labels import LATERALITY, CodedTerm, Tissue

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "ANALYSIS_NAME",
    "CODE_95TH_PERCENTILE",
    "CODE_THICKNESS",
    "CODE_VOLUME",
    "PROCEDURE",
    "SR_SERIES_NUMBER_OFFSET",
    "THICKNESS_STATISTICS",
    "measurement_group",
]

SR_SERIES_NUMBER_OFFSET = 2000  # SR series number = source series number + this (the SEG uses 1000)
CODE_VOLUME = CodedTerm("118565006", "Volume")
CODE_THICKNESS = CodedTerm("59089-3", "Thickness", "LN")
CODE_95TH_PERCENTILE = CodedTerm("371889001", "95th percentile")
# Key in the analysis' thickness dict -> derivation (CID 7464, plus the 95th percentile).
THICKNESS_STATISTICS: dict[str, CodedTerm] = {
    "mean": CodedTerm("373098007", "Mean"),
    "median": CodedTerm("373099004", "Median"),
    "std": CodedTerm("386136009", "Standard Deviation"),
    "p95": CODE_95TH_PERCENTILE,
}
PROCEDURE = CodedTerm("363679005", "Imaging procedure")
_UNIT_MM3 = CodedTerm("mm3", "cubic millimeter", "UCUM")
_UNIT_MM = CodedTerm("mm", "millimeter", "UCUM")
ANALYSIS_NAME = "OpenMSK knee analysis"


def _round(value: float, digits: int) -> float:
    # DS holds 16 characters: round so that the stored text is the value, not a truncation of it.
    return float(round(float(value), digits))


def measurement_group(
    tissue: Tissue,
    entry: dict[str, Any],
    seg: Dataset,
    segment_number: int,
    source_series_uid: str,
    laterality: str | None,
    tracking_uid: str,
    model_algorithm: Any,
    analysis_algorithm: Any,
) -> Any:
    import highdicom as hd

    site_kwargs: dict[str, Any] = {}
    if laterality is not None:
        site_kwargs["laterality"] = LATERALITY[laterality].to_code()
    if tissue.region_modifier is not None:
        site_kwargs["topographical_modifier"] = tissue.region_modifier.to_code()
    location = tissue.anatomic_region or tissue.property_type
    finding_sites = [hd.sr.FindingSite(anatomic_location=location.to_code(), **site_kwargs)]

    measurements = [
        hd.sr.Measurement(
            name=CODE_VOLUME.to_code(),
            value=_round(entry["volume_mm3"], 3),
            unit=_UNIT_MM3.to_code(),
            algorithm_id=analysis_algorithm,
        )
    ]
    thickness = entry.get("thickness_mm")
    if tissue.is_cartilage and thickness:
        for key, derivation in THICKNESS_STATISTICS.items():
            measurements.append(
                hd.sr.Measurement(
                    name=CODE_THICKNESS.to_code(),
                    value=_round(thickness[key], 4),
                    unit=_UNIT_MM.to_code(),
                    derivation=derivation.to_code(),
                    algorithm_id=analysis_algorithm,
                )
            )
    referenced = hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tissue.display_name),
        referenced_segment=referenced,
        finding_type=tissue.property_type.to_code(),
        finding_category=tissue.category.to_code(),
        finding_sites=finding_sites,
        algorithm_id=model_algorithm,
        measurements=measurements,
    )
