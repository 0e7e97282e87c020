"""Comparing two writes of one DICOM object: a rerun must write the same object, creation times aside."""

from __future__ import annotations

import pydicom

#: what differs between two writes of the same object: when each was made (ContributingEquipmentSequence holds
#: a ContributionDateTime)
PER_WRITE = frozenset(
    {
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "SeriesDate",
        "SeriesTime",
        "ContributingEquipmentSequence",
    }
)


def differing(a: pydicom.Dataset, b: pydicom.Dataset) -> list[str]:
    """Keywords of the top-level elements (sequences compared whole) in which *a* and *b* differ, creation
    times aside; ``[]`` for the same object."""
    keys = {e.keyword for e in a} | {e.keyword for e in b}
    return sorted(k for k in keys - PER_WRITE if a.get(k) != b.get(k))
