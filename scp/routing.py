"""Routing rules in the SCP: the rule model (re-exported from :mod:`openmsk.routing`, the shared core, where
the worker's start-up check reads it too) and the helpers of ``openmsk route test PATH``, which says for each
series which rule matched and why every other rule did not.

Rules live in a TOML file (``OPENMSK_ROUTING_RULES``; the documented default is ``scp/routing.toml``, whose
comments are the reference of the schema).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from openmsk.routing import (
    DEFAULT_MODEL,
    FALLBACK_DEFAULT_MODEL,
    PRIORITIES,
    Decision,
    RoutingError,
    RoutingRules,
    Rule,
    SeriesInfo,
    describe_archive,
    resolve_default_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "FALLBACK_DEFAULT_MODEL",
    "PRIORITIES",
    "Decision",
    "RoutingError",
    "RoutingRules",
    "Rule",
    "SeriesInfo",
    "format_decision",
    "resolve_default_model",
    "series_from_files",
]


# -------------------------------------------------------------------------------------------- route test PATH


def series_from_files(paths: Sequence[Path]) -> list[SeriesInfo]:
    """Group DICOM files by series (files that are not DICOM are skipped), in the order first seen.

    The calling and called AE come from the file meta (Source / Receiving Application Entity Title) — what the
    SCP writes into the files it receives.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    tags = [
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "BodyPartExamined",
        "SeriesDescription",
        "MRAcquisitionType",
        "ImageType",
        "SpecificCharacterSet",
    ]
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        if not series:
            continue
        entry = found.setdefault((study, series), {"ds": ds, "sops": set(), "meta": ds.file_meta})
        entry["sops"].add(str(ds.get("SOPInstanceUID", path.name)))
    result = []
    for (study, series), entry in found.items():
        ds = entry["ds"]
        image_type = ds.get("ImageType", [])
        image_type = [image_type] if isinstance(image_type, str) else list(image_type)
        meta = entry["meta"]
        info = SeriesInfo(
            study_uid=study,
            series_uid=series,
            modality=str(ds.get("Modality", "")).upper(),
            body_part=str(ds.get("BodyPartExamined", "")).upper(),
            series_description=str(ds.get("SeriesDescription", "")),
            mr_acquisition_type=str(ds.get("MRAcquisitionType", "")).upper(),
            image_type=tuple(str(v).upper() for v in image_type),
            instances=len(entry["sops"]),
            calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip(),
            called_ae=str(meta.get("ReceivingApplicationEntityTitle", "") or "").strip(),
        )
        result.append(info)
    return result


def format_decision(
    info: SeriesInfo, decision: Decision, archive_default: Sequence[str] | None = None
) -> str:
    """The ``route test`` report of one series: its attributes, the deciding rule and every verdict.

    With ``archive_default`` (the node's default archive) the archive is shown resolved, also for a series
    that no rule matched.
    """
    image_type = "\\".join(info.image_type) or "-"
    lines = [
        f"series {info.series_uid}",
        f"  {info.modality or '-'} {info.mr_acquisition_type or '-'}  body part {info.body_part or '-'}  "
        f"{info.instances} instance(s)  ImageType {image_type}  "
        f"description {info.series_description!r}  calling AE {info.calling_ae or '-'}  "
        f"called AE {info.called_ae or '-'}",
    ]
    if decision.rule is None:
        lines.append(f"  => no rule matched: ignored{describe_archive(None, archive_default)}")
    else:
        lines.append(f"  => rule {decision.rule.name!r}: {decision.rule.describe_action(archive_default)}")
    seen_match = False
    for rule, reasons in decision.verdicts:
        if rule is decision.rule:
            lines.append(f"     [match] {rule.name}")
            seen_match = True
        elif not reasons:
            lines.append(f"     [later] {rule.name}: also matches, but {decision.rule.name!r} comes first")
        else:
            tag = "[after]" if seen_match else "[no]   "
            lines.append(f"     {tag} {rule.name}: {'; '.join(reasons)}")
    return "\n".join(lines)
