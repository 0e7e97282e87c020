"""The derived MR series the T2 map is drawn over (one echo per slice): ``sop.py`` writes it, ``content.py``
says what it is."""

from worker.dicom.mr.content import MR_SERIES_NUMBER_OFFSET
from worker.dicom.mr.sop import DerivedSeries, derived_mr_uids, write_derived_mr

__all__ = ["MR_SERIES_NUMBER_OFFSET", "DerivedSeries", "derived_mr_uids", "write_derived_mr"]
