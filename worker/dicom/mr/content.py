"""What the derived MR series the T2 map is shown on says: series number, image type, derivation, reference.

* Series number: source series number + :data:`MR_SERIES_NUMBER_OFFSET` (beside the T2 map's +3000).
* Image Type ``DERIVED\\SECONDARY``: the default routing rules exclude DERIVED, so the series is never
  segmented again when Orthanc forwards it back to the node.
* Each instance references the echoes' instances at its slice as its sources, with the purpose
  "Source image for image processing operation" (DCM 121322, CID 7202).
"""

from __future__ import annotations

__all__ = [
    "IMAGE_TYPE",
    "MR_SERIES_NUMBER_OFFSET",
    "SOURCE_PURPOSE_CODE",
    "derivation_description",
    "series_description",
]

#: Series number = source series number + this (tissue SEG 1000, region SEG 1100, SR 2000, T2 map 3000).
MR_SERIES_NUMBER_OFFSET = 3001
IMAGE_TYPE = ["DERIVED", "SECONDARY", "OTHER"]  # MR: value 3 required
SOURCE_PURPOSE_CODE = ("121322", "DCM", "Source image for image processing operation")

_IMAGES = {
    "qdess": "root-sum-of-squares of the qDESS echoes",
    "mese": "echo 1 of the multi-echo spin echo",
}


def series_description(kind: str) -> str:
    """The series' description (LO, fitted by the writer): a PACS user finds it beside the T2 map."""
    return f"OpenMSK T2 map base ({'qDESS echo RSS' if kind == 'qdess' else 'MESE echo 1'})"


def derivation_description(kind: str, scale: float) -> str:
    """DerivationDescription (ST): which image this is and how its pixel values relate to the source's."""
    scaled = "" if scale == 1.0 else f"; pixel values x {scale:.6g} to fit the stored bits"
    return (
        f"The image OpenMSK segmented and computed the T2 map on: {_IMAGES.get(kind, kind)}{scaled}. "
        "One echo per slice, so viewers can overlay the T2 parametric map on it."
    )
