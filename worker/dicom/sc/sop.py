"""Secondary Capture images of the thickness colour maps, in the source study, so a PACS shows them.

A Parametric Map does not fit: the maps are unrolled or projected, not on the image grid, and have no patient
coordinates per pixel. They are RGB Secondary Capture images (one instance per map, one series), with the
colour bar in the pixels, patient and study copied from the source series (highdicom ``SCImage``). UIDs are
derived from (source series, model, version, map name), so a rerun replaces them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openmsk import __version__
from worker.dicom.general import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    VolumeLike,
    fit_text,
    knee_laterality,
    save_dataset,
    series_number,
)
from worker.dicom.sc.content import SC_SERIES_NUMBER_OFFSET, image_comment, series_description
from worker.uids import derive_uid

if TYPE_CHECKING:
    from worker.thickness_maps import ThicknessMap

__all__ = ["ScResult", "sc_uids", "write_thickness_sc"]


@dataclass(frozen=True)
class ScResult:
    """One Secondary Capture written: the map's name, UIDs, SOP class and path."""

    name: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    path: Path


def sc_uids(source_series_uid: str, model_name: str, model_version: str, name: str) -> tuple[str, str]:
    """(SeriesInstanceUID shared by the maps, SOPInstanceUID of map *name*)."""
    return (
        derive_uid(source_series_uid, model_name, model_version, "sc-thickness", "series"),
        derive_uid(source_series_uid, model_name, model_version, "sc-thickness", name),
    )


def write_thickness_sc(
    volume: VolumeLike,
    maps: Sequence[ThicknessMap],
    model_name: str,
    model_version: str,
    out_dir: str | Path,
) -> list[ScResult]:
    """Write each map as ``thickness_<name>.dcm`` in *out_dir*; instance numbers follow the map order.

    Raises
    ------
    ValueError
        When the model is unnamed or the volume has no source instances (nothing to put the maps beside).
    """
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    if not model_name or not model_version:
        raise ValueError("model_name and model_version must be non-empty")
    if not volume.sources:
        raise ValueError("the maps go into the source study: the volume has no source instances")
    source0 = volume.sources[0]
    source_series = str(source0.SeriesInstanceUID)
    laterality = knee_laterality(source0)
    folder = Path(out_dir)
    results = []
    for number, m in enumerate(maps, start=1):
        series_uid, sop_uid = sc_uids(source_series, model_name, model_version, m.spec.name)
        pixels = np.ascontiguousarray(m.rgb, dtype=np.uint8)
        kwargs: dict[str, Any] = {}
        if laterality is not None:
            kwargs["laterality"] = laterality
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source0,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number(source0, SC_SERIES_NUMBER_OFFSET),
            sop_instance_uid=sop_uid,
            instance_number=number,
            manufacturer=MANUFACTURER,
            # Columns run towards patient left; rows towards posterior (unrolled femur: anterior -> distal
            # -> posterior; tibia from above) or inferior (patella from the front).
            patient_orientation=m.spec.orientation,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            **kwargs,
        )
        sc.SeriesDescription = fit_text(series_description(model_name, model_version), 64)
        sc.ImageComments = image_comment(m.spec.title, m.scale_mm)
        sc.DerivationDescription = fit_text(f"{m.spec.title} from the {model_name} segmentation", 1024)
        sc.ManufacturerModelName = MANUFACTURER_MODEL_NAME
        sc.SoftwareVersions = __version__
        sc.BurnedInAnnotation = "NO"  # titles and the colour bar only, no patient data in the pixels
        path = save_dataset(sc, folder / f"thickness_{m.spec.name}.dcm")
        results.append(ScResult(m.spec.name, series_uid, sop_uid, str(sc.SOPClassUID), path))
    return results
