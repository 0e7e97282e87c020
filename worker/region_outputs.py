"""The outputs of the knee science after the analysis: region SEG, thickness maps (PNG and Secondary Capture)
and the change since the prior visit, written beside the tissue outputs by ``worker.pipeline``.

Kept out of the pipeline so that it stays a list of stages: the pipeline calls :func:`add_change` before the
report (report.json and the SR then carry ``measurements["change"]``) and :func:`write_region_outputs` before
the SR (which references the region SEG).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from worker.analysis_process import HelperCall, start_region_seg
from worker.dicom.general import VolumeLike, knee_laterality
from worker.dicom.sc import write_thickness_sc
from worker.dicom.seg import SegResult, seg_header
from worker.thickness_maps import AnatomicalFrame, write_thickness_maps

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from worker.prior import PriorLookup

__all__ = ["RegionOutputs", "add_change", "write_region_outputs"]


@dataclass
class RegionOutputs:
    """What :func:`write_region_outputs` wrote: files, DICOM results (path, SOP class, SOP instance UID), and
    the region SEG's identity for the SR (:func:`worker.dicom.seg.seg_header`; ``None`` without a region map
    or DICOM outputs).

    The region SEG is still being written in the helper process when this is returned: :meth:`finish`
    waits for it, and must be called before the files are used.
    """

    files: list[Path] = field(default_factory=list)
    dicom: list[tuple[Path, str, str]] = field(default_factory=list)
    region_seg: Dataset | None = None
    _pending: HelperCall[SegResult] | None = field(default=None, repr=False)

    def finish(self) -> None:
        """Wait for the region SEG; raises what its writing raised."""
        if self._pending is None or self.region_seg is None:
            return
        written = self._pending.result()
        self._pending = None
        if written.sop_uid != str(self.region_seg.SOPInstanceUID):  # the SR referenced another object
            raise RuntimeError("the region SEG written is not the one the SR references")


def _rotation(measurements: dict[str, Any], affine: NDArray[Any]) -> NDArray[Any] | None:
    """The knee frame's rotation from the analysis (``region_frame``), else None (the patient axes)."""
    axes = (measurements.get("region_frame") or {}).get("axes")
    frame = AnatomicalFrame.from_grid_axes(axes, affine) if axes else None
    return None if frame is None else frame.rotation


def write_region_outputs(
    volume: VolumeLike,
    labels: NDArray[Any],
    region_map: NDArray[Any] | None,
    measurements: dict[str, Any],
    model_name: str,
    model_version: str,
    out_dir: Path,
    *,
    dicom_outputs: bool = True,
    labelmap: bool = False,
    faces: Mapping[int, Any] | None = None,
) -> RegionOutputs:
    """Thickness maps (``thickness_<cartilage>.png``), and with DICOM outputs the region SEG
    (``seg_regions.dcm``, a Label Map SEG with *labelmap*, like the tissue SEG) and the maps' Secondary
    Captures (``thickness_<cartilage>.dcm``). *faces*: the analysis' per-face thickness by cartilage label
    (``worker.analysis.FaceThickness``), drawn where given instead of the volume-per-area proxy."""
    out = RegionOutputs()
    if dicom_outputs and region_map is not None and np.any(region_map):
        # Started first, so the helper process writes it while the maps are drawn and the SR is built here.
        path = out_dir / "seg_regions.dcm"
        out.region_seg = seg_header(
            volume, region_map, model_name, model_version, regions=True, labelmap=labelmap
        )
        out._pending = start_region_seg(
            volume, region_map, model_name, model_version, path, labelmap=labelmap
        )
        out.files.append(path)
        out.dicom.append((path, str(out.region_seg.SOPClassUID), str(out.region_seg.SOPInstanceUID)))
    affine = np.asarray(volume.affine_lps, dtype=np.float64)
    laterality = knee_laterality(volume.sources[0]) if volume.sources else None
    maps = write_thickness_maps(
        labels, affine, out_dir, laterality=laterality, rotation=_rotation(measurements, affine), faces=faces
    )
    out.files.extend(m.path for m in maps if m.path is not None)
    if not dicom_outputs:
        return out
    for sc in write_thickness_sc(volume, maps, model_name, model_version, out_dir) if maps else []:
        out.files.append(sc.path)
        out.dicom.append((sc.path, sc.sop_class_uid, sc.sop_uid))
    return out


def add_change(
    measurements: dict[str, Any],
    volume: VolumeLike,
    priors: PriorLookup | None,
    model_name: str,
    model_version: str,
) -> None:
    """Put ``change`` (since the prior visit) into *measurements* when *priors* finds one, and remember this
    result for later visits. Nothing happens without priors or DICOM sources (no PatientID to match)."""
    if priors is None or not volume.sources:
        return
    change = priors.change_and_remember(volume.sources[0], measurements, model_name, model_version)
    if change is not None:
        measurements["change"] = change
