"""The T2 parametric map (DICOM Parametric Map, float32, ms): ``sop.py`` writes it, ``content.py`` its codes."""

from worker.dicom.pm.content import PM_SERIES_NUMBER_OFFSET, T2_CODE, UNIT_MS, t2_value_mapping
from worker.dicom.pm.sop import PmResult, pm_uids, read_pm_map, write_pm

__all__ = [
    "PM_SERIES_NUMBER_OFFSET",
    "T2_CODE",
    "UNIT_MS",
    "PmResult",
    "pm_uids",
    "read_pm_map",
    "t2_value_mapping",
    "write_pm",
]
