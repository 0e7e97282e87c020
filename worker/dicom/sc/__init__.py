"""Secondary Capture images of the cartilage thickness maps: ``sop.py`` writes them, ``content.py`` names them."""

from worker.dicom.sc.content import SC_SERIES_NUMBER_OFFSET, image_comment, series_description
from worker.dicom.sc.sop import ScResult, sc_uids, write_thickness_sc

__all__ = [
    "SC_SERIES_NUMBER_OFFSET",
    "ScResult",
    "image_comment",
    "sc_uids",
    "series_description",
    "write_thickness_sc",
]
