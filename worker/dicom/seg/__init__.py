"""The knee DICOM Segmentations (tissues, cartilage regions): ``sop.py`` writes them, ``content.py`` describes
their segments."""

from worker.dicom.seg.content import (
    CONTENT_LABEL,
    REGION_CONTENT_LABEL,
    REGION_KINDS,
    REGION_SEG_SERIES_NUMBER_OFFSET,
    SEG_SERIES_NUMBER_OFFSET,
    TISSUE_KINDS,
    SegmentKind,
    segment_description,
    segment_numbers,
)
from worker.dicom.seg.sop import SegResult, seg_header, seg_uids, write_seg

__all__ = [
    "CONTENT_LABEL",
    "REGION_CONTENT_LABEL",
    "REGION_KINDS",
    "REGION_SEG_SERIES_NUMBER_OFFSET",
    "SEG_SERIES_NUMBER_OFFSET",
    "TISSUE_KINDS",
    "SegResult",
    "SegmentKind",
    "seg_header",
    "seg_uids",
    "segment_description",
    "segment_numbers",
    "write_seg",
]
