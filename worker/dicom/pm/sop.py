"""The T2 map as a DICOM Parametric Map (float32 pixels, in 100 ms units mapped to ms), in the source study.

The map shares the source series' study and frame of reference and references the images it lies on: the
derived one-echo series of :mod:`worker.dicom.mr` first (viewers draw the map over the first series), the
echoes as further sources (the map is derived from all of them); without the derived series, echo 1 comes
first. It carries a Real World Value Mapping to ms with the T2 quantity code (:mod:`worker.dicom.pm.content`
says why the stored unit is 100 ms). Series and SOP Instance UIDs are derived from (source SeriesInstanceUID,
model name, model version, T2 model, "t2-pm"): a rerun replaces the map in the PACS instead of adding a second
one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from openmsk import __version__
from worker.dicom.general import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    VolumeLike,
    fit_text,
    knee_laterality,
    person_name,
    reproducible_dimensions,
    save_dataset,
    series_number,
)
from worker.dicom.pm.content import (
    CONTENT_LABEL,
    PM_SERIES_NUMBER_OFFSET,
    STORED_UNIT_MS,
    T2_WINDOW_MS,
    t2_value_mapping,
)
from worker.uids import derive_uid

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["PmResult", "pm_uids", "read_pm_map", "write_pm"]


@dataclass(frozen=True)
class PmResult:
    """What :func:`write_pm` wrote."""

    series_uid: str
    sop_uid: str
    sop_class_uid: str
    path: Path
    dataset: Dataset | None = field(default=None, repr=False, compare=False)


def pm_uids(source_series_uid: str, model_name: str, model_version: str, t2_model: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the T2 map of a source series."""
    parts = (source_series_uid, model_name, model_version, t2_model, "t2-pm")
    return derive_uid(*parts, "series"), derive_uid(*parts, "instance")


def write_pm(
    volume: VolumeLike,
    t2_ms: NDArray[Any],
    model_name: str,
    model_version: str,
    t2_model: str,
    out_path: str | Path,
    *,
    further_sources: Sequence[Dataset] = (),
    source_images: Sequence[Dataset] | None = None,
) -> PmResult:
    """Write the T2 map *t2_ms* (ms, on *volume*'s grid, index (i, j, k)) as a Parametric Map to *out_path*.

    Parameters
    ----------
    volume: VolumeLike
        The series the map was computed from (its ``sources``: echo 1's instances, one per slice).
    t2_ms: numpy.ndarray
        The map; NaN and negative values are stored as 0 (no value).
    model_name, model_version: str
        The segmentation model the job ran (the map depends on its labels through the assumed T1).
    t2_model: str
        ``"qdess"`` or ``"mese"``: takes part in the UIDs and the description.
    further_sources: sequence of Dataset
        The other echoes' instances, referenced as further source images.
    source_images: sequence of Dataset, optional
        The images the map's frames lie on, one per slice in slice order (default: ``volume.sources``); the
        first series referenced, the one a viewer overlays the map on.

    Raises
    ------
    ValueError
        When the map does not match the volume.
    """
    import highdicom as hd

    shape = tuple(np.shape(volume.image))
    if tuple(t2_ms.shape) != shape:
        raise ValueError(f"T2 map shape {t2_ms.shape} differs from the image shape {shape}")
    sources = list(volume.sources if source_images is None else source_images)
    if len(sources) != shape[2]:
        raise ValueError(f"{len(sources)} source instances for {shape[2]} slices")
    if not model_name or not model_version:
        raise ValueError("model_name and model_version must be non-empty")
    values = np.nan_to_num(np.asarray(t2_ms, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    np.maximum(values, 0.0, out=values)
    peak_ms = float(values.max()) if values.size else 0.0
    # (i, j, k) -> (frame k, row j, column i), the frame layout highdicom expects; stored in 100 ms units
    pixels = np.ascontiguousarray(values.transpose(2, 1, 0)) / np.float32(STORED_UNIT_MS)
    source0 = volume.sources[0]  # the acquired series: the UIDs, series number and laterality come from it
    series_uid, sop_uid = pm_uids(str(source0.SeriesInstanceUID), model_name, model_version, t2_model)
    label = "qDESS" if t2_model == "qdess" else "multi-echo SE"
    pm = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=pixels,
        series_instance_uid=series_uid,
        series_number=series_number(source0, PM_SERIES_NUMBER_OFFSET),
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=__version__,
        device_serial_number="1",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[t2_value_mapping(peak_ms)],
        voi_lut_transformations=[  # on the stored values
            hd.VOILUTTransformation(
                window_center=T2_WINDOW_MS[0] / STORED_UNIT_MS,
                window_width=T2_WINDOW_MS[1] / STORED_UNIT_MS,
                window_explanation="T2 0-80 ms",
                voi_lut_function="LINEAR_EXACT",  # a width under 1 needs it; exact suits a float map anyway
            )
        ],
        content_label=CONTENT_LABEL,
        content_description=fit_text(f"T2 map ({label}), {model_name} {model_version}", 64),
        content_creator_name=person_name(MANUFACTURER_MODEL_NAME),
        further_source_images=list(further_sources) or None,
    )
    _order_frames_along_the_normal(pm)
    pm.SeriesDescription = fit_text(f"OpenMSK T2 map ms ({label})", 64)
    laterality = knee_laterality(source0)
    if laterality is not None:  # General Series, type 2C for a paired body part: the knee's side
        pm.Laterality = laterality
    if source0.get("BodyPartExamined"):
        pm.BodyPartExamined = source0.BodyPartExamined
    reproducible_dimensions(pm)
    path = save_dataset(pm, out_path)
    return PmResult(series_uid, sop_uid, str(pm.SOPClassUID), path, pm)


def _order_frames_along_the_normal(pm: Dataset) -> None:
    """Put the frames in ascending position along row x column, the order viewers stack the source images.

    highdicom sorts the frames the other way. Each frame keeps its own functional groups (position, dimension
    index), so any order is valid DICOM, but OHIF's parametric-map extension ignores the positions and fills
    its volume frame by frame from the lowest slice: in highdicom's order the map would be drawn upside down.
    """
    groups = list(pm.PerFrameFunctionalGroupsSequence)
    orientation = np.asarray(
        pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float
    )
    normal = np.cross(orientation[:3], orientation[3:])
    distances = [float(np.dot(normal, g.PlanePositionSequence[0].ImagePositionPatient)) for g in groups]
    order = np.argsort(distances, kind="stable")
    if np.array_equal(order, np.arange(len(groups))):
        return
    frames = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(len(groups), -1)
    pm.FloatPixelData = np.ascontiguousarray(frames[order]).tobytes()
    pm.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]


def read_pm_map(dataset: Dataset, affine_lps: NDArray[Any], shape: Sequence[int]) -> NDArray[np.float32]:
    """The T2 values (ms) of a written map, back on the (i, j, k) grid of *affine_lps* and *shape*.

    Each frame goes to the slice its ImagePositionPatient lies on: highdicom orders the frames by position
    (and may leave out empty ones), not necessarily in the volume's slice order. Unset slices are 0.
    """
    frames = dataset.pixel_array.astype(np.float32)
    if frames.ndim == 2:
        frames = frames[None]
    item = dataset.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    frames = frames * float(item.RealWorldValueSlope) + float(item.RealWorldValueIntercept)
    inverse = np.linalg.inv(np.asarray(affine_lps, float))
    out = np.zeros(tuple(shape), np.float32)
    for frame, group in zip(frames, dataset.PerFrameFunctionalGroupsSequence, strict=True):
        position = np.array([*group.PlanePositionSequence[0].ImagePositionPatient, 1.0], float)
        i, j, k = np.rint(inverse @ position)[:3].astype(int)
        if i != 0 or j != 0 or not 0 <= k < shape[2]:
            raise ValueError(f"frame at {position[:3].tolist()} is not a slice of the volume")
        out[:, :, k] = frame.T
    return out
