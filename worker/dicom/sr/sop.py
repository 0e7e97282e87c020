"""DICOM SR Measurement Report (TID 1500) of the knee measurements, next to the SEG in the PACS.

One TID 1411 "Volumetric ROI Measurements" group per measured tissue and, when the region SEG is given, per
measured cartilage subregion. Each group references its segment of the tissue or region SEG (and through it
the source series), names the tissue or region with the SEG's codes (finding type = segmented property type,
finding site = the covered bone with laterality and the region's topographical modifiers) and holds what was
measured (:mod:`worker.dicom.sr.content` lists the codes):

* Volume (SCT 118565006) in mm3;
* Thickness (LOINC 59089-3) in mm for every cartilage sheet and subregion, four times, with the derivations
  Mean (SCT 373098007), Median (SCT 373099004), Standard Deviation (SCT 386136009) and 95th percentile
  (SCT 371889001);
* the covered bone-interface Area (SCT 42798000) in mm2, where measured;
* T2 (DCM 113065) in ms with the same derivations, wherever an entry has ``t2_ms``.

A value that was not measurable is left out (never 0); a region with nothing measured gets no group. When the
measurements hold a comparable ``change`` since the prior visit, each region with a change gets one more group,
"Change since <prior date>: <region>", with the difference of its mean thickness in mm and in %.

The document is a Comprehensive 3D SR (what TID 1500 readers such as dcmqi and OHIF expect), marked complete
and unverified: it is an automatic result that no person has signed. Its UIDs are derived like the SEG's, so a
rerun replaces it in the PACS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openmsk import __version__
from openmsk.labels import BY_NAME
from openmsk.regions import REGIONS_BY_NAME
from worker.dicom.general import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    VolumeLike,
    fit_text,
    knee_laterality,
    save_dataset,
    series_number,
)
from worker.dicom.seg.content import REGION_KINDS, TISSUE_KINDS
from worker.dicom.seg.content import segment_numbers as seg_segment_numbers
from worker.dicom.sr.content import (
    ANALYSIS_NAME,
    PROCEDURE,
    SR_SERIES_NUMBER_OFFSET,
    change_group,
    measurement_group,
)
from worker.uids import derive_uid

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["SrResult", "measurement_document", "sr_uids", "write_sr"]


@dataclass(frozen=True)
class SrResult:
    """What :func:`write_sr` wrote: UIDs, the path, and the tissues, regions and region changes that got a
    measurement group, in order."""

    series_uid: str
    sop_uid: str
    path: Path | None = None
    tissues: tuple[str, ...] = ()
    sop_class_uid: str = ""
    regions: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()


def sr_uids(source_series_uid: str, model_name: str, model_version: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the measurement report for a model run on a source series."""
    return (
        derive_uid(source_series_uid, model_name, model_version, "sr", "series"),
        derive_uid(source_series_uid, model_name, model_version, "sr", "instance"),
    )


def _load_seg(seg: str | Path | Dataset) -> Dataset:
    from pydicom import dcmread
    from pydicom.dataset import Dataset

    if isinstance(seg, Dataset):
        return seg
    # The SR needs the SEG's identity and segment table only, not its frames.
    return dcmread(str(seg), stop_before_pixels=True)


def write_sr(
    seg_path_or_dataset: str | Path | Dataset,
    volume: VolumeLike,
    measurements: dict[str, Any],
    model_name: str,
    model_version: str,
    out_path: str | Path,
    *,
    region_seg: str | Path | Dataset | None = None,
) -> SrResult:
    """Write the TID 1500 measurement report of *measurements* (from :func:`worker.analysis.analyse`).

    Parameters
    ----------
    seg_path_or_dataset: str | pathlib.Path | pydicom.Dataset
        The SEG written by :func:`worker.dicom.seg.write_seg` for the same labels; the groups reference its
        segments.
    volume: VolumeLike
        The source series (its first instance gives the series UID and the knee's laterality).
    measurements: dict
        ``analyse()`` output: ``tissues`` keyed by tissue name with ``volume_mm3`` and, for cartilage,
        ``thickness_mm``.
    model_name, model_version: str
        The segmentation model; takes part in the UIDs and is the groups' algorithm identification.
    out_path: str | pathlib.Path
        Target file, written atomically.
    region_seg: str | pathlib.Path | pydicom.Dataset | None
        The region SEG (``write_seg(..., regions=True)``); without it the ``regions`` and ``change`` of the
        measurements are not reported.

    Raises
    ------
    ValueError
        When a SEG was not made from this series, or a measured tissue (region) has no segment in its SEG (a
        measurement group must reference its region).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not model_name or not model_version:
        raise ValueError("model_name and model_version must be non-empty")
    seg = _load_seg(seg_path_or_dataset)
    source0 = volume.sources[0]
    source_series_uid = str(source0.SeriesInstanceUID)
    _check_source(seg, source_series_uid)
    numbers = seg_segment_numbers(seg)
    laterality = knee_laterality(source0)

    tissues = measurements.get("tissues", {})
    unknown = sorted(set(tissues) - set(BY_NAME))
    if unknown:
        raise ValueError(f"unknown tissues in the measurements: {unknown}")
    missing = sorted(name for name in tissues if name not in numbers)
    if missing:
        raise ValueError(f"tissues measured but not segmented in the SEG: {missing}")
    if not tissues:
        raise ValueError("no measurements to report")

    model_algorithm = hd.sr.AlgorithmIdentification(
        name=fit_text(model_name, 64), version=fit_text(model_version, 64)
    )
    analysis_algorithm = hd.sr.AlgorithmIdentification(name=ANALYSIS_NAME, version=__version__)

    def tracking(*parts: str) -> str:
        return derive_uid(source_series_uid, model_name, model_version, *parts)

    groups = []
    ordered: list[str] = []
    for name in sorted(tissues, key=lambda name: BY_NAME[name].label):
        kind = TISSUE_KINDS[BY_NAME[name].label]
        group = measurement_group(
            kind,
            tissues[name],
            seg,
            numbers[name],
            source_series_uid,
            laterality,
            tracking("tracking", name),
            model_algorithm,
            analysis_algorithm,
        )
        if group is not None:
            groups.append(group)
            ordered.append(name)

    evidence = [seg]
    reported_regions: list[str] = []
    changes: list[str] = []
    rnumbers: dict[str, int] = {}
    if region_seg is not None:
        rseg = _load_seg(region_seg)
        _check_source(rseg, source_series_uid)
        evidence.append(rseg)
        rnumbers = seg_segment_numbers(rseg)
        regions = measurements.get("regions") or {}
        unknown = sorted(set(regions) - set(REGIONS_BY_NAME))
        if unknown:
            raise ValueError(f"unknown regions in the measurements: {unknown}")
        for name in sorted(regions, key=lambda name: REGIONS_BY_NAME[name].label):
            kind = REGION_KINDS[REGIONS_BY_NAME[name].label]
            if name not in rnumbers:
                if any(regions[name].get(key) is not None for key in ("volume_mm3", "thickness_mm")):
                    raise ValueError(f"region measured but not segmented in the region SEG: {name}")
                continue  # not measurable and not in the map: nothing to report or reference
            group = measurement_group(
                kind,
                regions[name],
                rseg,
                rnumbers[name],
                source_series_uid,
                laterality,
                tracking("tracking-region", name),
                model_algorithm,
                analysis_algorithm,
            )
            if group is not None:
                groups.append(group)
                reported_regions.append(name)
    change = measurements.get("change") or {}
    if change.get("comparable"):
        prior_date = _iso_date(str((change.get("prior") or {}).get("study_date") or ""))
        # Where each changed name's segment is: cartilages in the tissue SEG, subregions in the region SEG.
        targets: dict[str, tuple[Any, Dataset, int]] = {
            name: (TISSUE_KINDS[BY_NAME[name].label], seg, numbers[name])
            for name in numbers
            if name in BY_NAME
        }
        if region_seg is not None:
            targets |= {
                name: (REGION_KINDS[REGIONS_BY_NAME[name].label], rseg, rnumbers[name])
                for name in rnumbers
                if name in REGIONS_BY_NAME
            }
        for name in sorted(
            change.get("regions") or {}, key=lambda n: targets[n][0].label if n in targets else 0
        ):
            if name not in targets:
                continue
            kind, target_seg, number = targets[name]
            group = change_group(
                kind,
                change["regions"][name],
                prior_date,
                target_seg,
                number,
                source_series_uid,
                laterality,
                tracking("tracking-change", name),
                analysis_algorithm,
            )
            if group is not None:
                groups.append(group)
                changes.append(name)

    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("device", MANUFACTURER_MODEL_NAME),
            name=MANUFACTURER_MODEL_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=MANUFACTURER_MODEL_NAME,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE.to_code(),
        imaging_measurements=groups,
    )
    series_uid, sop_uid = sr_uids(source_series_uid, model_name, model_version)
    sr = measurement_document(
        report,
        evidence,
        series_instance_uid=series_uid,
        series_number=series_number(source0, SR_SERIES_NUMBER_OFFSET),
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=fit_text(f"OpenMSK knee measurements ({model_name} {model_version})", 64),
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=__version__,
    )
    path = save_dataset(sr, out_path)
    return SrResult(
        series_uid=series_uid,
        sop_uid=sop_uid,
        path=path,
        tissues=tuple(ordered),
        sop_class_uid=str(sr.SOPClassUID),
        regions=tuple(reported_regions),
        changes=tuple(changes),
    )


def measurement_document(report: Any, evidence: list[Dataset], **attributes: Any) -> Dataset:
    """The Comprehensive 3D SR document of a TID 1500 *report* (``highdicom.sr.MeasurementReport``) whose
    groups reference only the instances in *evidence*: what ``highdicom.sr.Comprehensive3DSR(evidence,
    report, **attributes)`` makes, for less than half its time.

    highdicom's constructor deep-copies the content tree, reads the copy back into typed content items and
    walks the tree for the instances it references (about 0.35 s for the ~2,300 items of a knee report: a third
    of the SR's time, on the critical path of every job). Here the document is made around the root
    container alone and the tree is attached after it: its items come from highdicom's templates, which
    validated them, and the evidence (the SEGs) is what highdicom lists anyway, since it lists every evidence
    instance given, referenced or not. The result is only written, never read back as highdicom content
    (its typed view holds the root alone); ``tests/test_region_outputs.py`` checks that the file is the one
    highdicom writes.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset

    root = report[0]
    given = {str(item.SOPInstanceUID) for item in evidence}
    missing = sorted(_referenced_instances(root.ContentSequence) - given)
    if missing:  # as highdicom refuses it
        raise ValueError(f"no evidence was given for the instances the report references: {missing}")
    container = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            container.add(element)
    container.ContentSequence = []  # highdicom looks into it for references
    document = hd.sr.Comprehensive3DSR(evidence=evidence, content=container, **attributes)
    document.ContentSequence = root.ContentSequence
    return document


def _referenced_instances(items: Any) -> set[str]:
    """The SOP Instance UIDs that IMAGE and COMPOSITE items of the content tree *items* reference."""
    found: set[str] = set()
    for item in items:
        if item.ValueType in ("IMAGE", "COMPOSITE"):
            found.update(str(ref.ReferencedSOPInstanceUID) for ref in item.ReferencedSOPSequence)
        elif "ContentSequence" in item:
            found |= _referenced_instances(item.ContentSequence)
    return found


def _check_source(seg: Dataset, source_series_uid: str) -> None:
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if referenced and source_series_uid not in referenced:
        raise ValueError("the SEG does not reference the source series of this volume")


def _iso_date(value: str) -> str:
    """``20250131`` -> ``2025-01-31`` (a DA as people read it); anything else as it is, or "prior visit"."""
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "prior visit"
