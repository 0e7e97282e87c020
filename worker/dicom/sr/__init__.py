"""The knee measurement report (TID 1500 SR): ``sop.py`` writes it, ``content.py`` holds its codes and groups."""

from worker.dicom.sr.content import (
    CODE_95TH_PERCENTILE,
    CODE_AREA,
    CODE_T2,
    CODE_THICKNESS,
    CODE_VOLUME,
    SR_SERIES_NUMBER_OFFSET,
    STATISTICS,
    THICKNESS_STATISTICS,
    change_group,
    change_identifier,
    measurement_group,
)
from worker.dicom.sr.sop import SrResult, measurement_document, sr_uids, write_sr

__all__ = [
    "CODE_95TH_PERCENTILE",
    "CODE_AREA",
    "CODE_T2",
    "CODE_THICKNESS",
    "CODE_VOLUME",
    "SR_SERIES_NUMBER_OFFSET",
    "STATISTICS",
    "THICKNESS_STATISTICS",
    "SrResult",
    "change_group",
    "change_identifier",
    "measurement_document",
    "measurement_group",
    "sr_uids",
    "write_sr",
]
