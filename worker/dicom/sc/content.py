"""What the thickness-map Secondary Capture series says: its series number, descriptions and kind."""

from __future__ import annotations

__all__ = ["SC_SERIES_NUMBER_OFFSET", "image_comment", "series_description"]

# SC series number = source series number + this (tissue SEG 1000, region SEG 1100, SR 2000, T2 map 3000).
SC_SERIES_NUMBER_OFFSET = 4000


def series_description(model_name: str, model_version: str) -> str:
    """The series' description (LO, fitted by the writer): a PACS user finds the maps by it."""
    return f"OpenMSK cartilage thickness maps ({model_name} {model_version})"


def image_comment(title: str, scale_mm: float) -> str:
    """ImageComments of one map: what it shows and its colour scale (the colour bar is in the pixels too)."""
    return f"{title}; colour scale 0-{scale_mm:g} mm; display map, not a measurement"
