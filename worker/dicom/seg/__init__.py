"""The knee DICOM Segmentation: ``sop.py`` writes it, ``content.py`` describes its segments."""

from worker.dicom.seg.content import (
    CONTENT_LABEL,
    SEG_SERIES_NUMBER_OFFSET,
    segment_description,
    segment_numbers,
)
from worker.dicom.seg.sop import SegResult, seg_uids, write_seg

__all__ = [
    "CONTENT_LABEL",
    "SEG_SERIES_NUMBER_OFFSET",
    "SegResult",
    "seg_uids",
    "segment_description",
    "segment_numbers",
    "write_seg",
]
