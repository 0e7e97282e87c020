"""Deterministic DICOM UIDs for what the node writes.

A rerun of the same model on the same series must produce the same Series and SOP Instance UIDs, so that a
PACS replaces the earlier SEG/SR instead of storing a duplicate. The UIDs are therefore derived from names,
not drawn at random: ``2.25.<decimal of a name-based UUID>`` (ISO/IEC 9834-8 / ITU-T X.667, the UID form that
needs no registered organisation root), the UUID being UUIDv5 of the parts under the node's fixed namespace.

``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` is not used because it ignores the entropy sources
when there is no prefix, and a prefix would need an organisation root the node does not own.
"""

from __future__ import annotations

import uuid

__all__ = ["UID_NAMESPACE", "UID_ROOT", "derive_uid"]

# The node's root (the UUID-derived arc) and its namespace; changing either changes every UID the node writes.
UID_ROOT = "2.25."
UID_NAMESPACE = uuid.UUID("0b6f4a2e-8c1d-5e3f-9a4b-6d2c1e0f7a58")

# Separates the parts before hashing so that ("ab", "c") and ("a", "bc") give different UIDs.
_SEPARATOR = "\x1f"


def derive_uid(*parts: str) -> str:
    """The UID for *parts* (e.g. source SeriesInstanceUID, model name, model version, what is written).

    The same parts give the same UID on every host and every run; any difference in any part gives another
    UID. Patient data must not be passed: UIDs leave the node. Source UIDs are fine, they are already UIDs.

    Raises
    ------
    TypeError
        When a part is not a string.
    ValueError
        When no part is given or a part is empty.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"UID parts must be strings, got {type(part).__name__}")
        if not part:
            raise ValueError("UID parts must not be empty")
    name = "openmsk-node" + _SEPARATOR + _SEPARATOR.join(parts)
    uid = f"{UID_ROOT}{uuid.uuid5(UID_NAMESPACE, name).int}"
    # 2.25. plus at most 39 digits: always within the 64 characters of the UI value representation.
    assert len(uid) <= 64
    return uid
