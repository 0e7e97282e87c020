"""What the T2 parametric map is made of: its quantity code, unit, value mapping, series number offset.

* Quantity: T2, DCM 113065 (CID 7180, the quantities of parametric maps; DCM defines it as the transverse
  relaxation time), the same code the SR's T2 measurements use.
* Unit: UCUM ``ms``.
* Real World Value Mapping: the stored float32 values are T2 in units of :data:`STORED_UNIT_MS` (100 ms), the
  mapping's slope turns them into ms (intercept 0); 0 means "no value" (outside the fitted range or the
  goodness-of-fit mask). Why not ms as they are: OHIF's parametric-map viewport ignores the mapping, multiplies
  the stored values by 100 and windows 0-100 (it expects values 0-1); stored as T2/100 ms, it shows the map in
  ms over 0-100 ms, exactly T2's fitted range. A viewer that applies the mapping reads ms either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import highdicom as hd

__all__ = [
    "CONTENT_LABEL",
    "PM_SERIES_NUMBER_OFFSET",
    "STORED_UNIT_MS",
    "T2_CODE",
    "T2_WINDOW_MS",
    "UNIT_MS",
    "t2_value_mapping",
]

#: Series number = source series number + this (SEG 1000, SR 2000).
PM_SERIES_NUMBER_OFFSET = 3000
CONTENT_LABEL = "T2_MAP"
#: One stored unit in ms (see the module docstring).
STORED_UNIT_MS = 100.0
#: (centre, width) of the default display window in ms: cartilage and menisci, 0-80 ms.
T2_WINDOW_MS = (40.0, 80.0)
T2_CODE = ("113065", "DCM", "T2")
UNIT_MS = ("ms", "UCUM", "millisecond")


def t2_value_mapping(max_value_ms: float) -> hd.pm.RealWorldValueMapping:
    """The Real World Value Mapping of a T2 map of 0..*max_value_ms* ms, stored in units of 100 ms."""
    import highdicom as hd

    return hd.pm.RealWorldValueMapping(
        lut_label="T2_MS",
        lut_explanation="T2 relaxation time (ms); 0 = no value",
        unit=hd.sr.CodedConcept(*UNIT_MS),
        value_range=(0.0, float(max(max_value_ms, 1.0)) / STORED_UNIT_MS),
        slope=STORED_UNIT_MS,
        intercept=0.0,
        quantity_definition=hd.sr.CodedConcept(*T2_CODE),
    )
