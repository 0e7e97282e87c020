"""The stages that turn a series into results: load → preprocess → infer → postprocess → write → analyse.

The same code serves a queued job (progress goes to the job record) and the one-shot ``openmsk segment`` CLI
(progress goes to a terminal bar): each stage reports ``(stage, fraction of the stage)`` to a :class:`Progress`,
which maps it onto the job's overall percent using :data:`STAGE_SPAN`. Delivery is a separate actor
(``worker.actors``) so a destination that is down never holds a worker that could segment.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from openmsk import __version__
from openmsk.atomic import write_atomic
from openmsk.jobs import ErrorCode
from openmsk.models.registry import ModelEntry
from worker.analysis_process import start_analysis
from worker.dicom.seg import write_seg
from worker.dicom.sr import write_sr
from worker.errors import JobFailure
from worker.models.segmenter import Segmenter, from_canonical, to_canonical
from worker.preview import write_preview
from worker.prior import PriorLookup
from worker.region_outputs import add_change, write_region_outputs
from worker.report import write_report
from worker.t2 import MultiEchoVolume
from worker.t2.stage import T2Warning, run_t2
from worker.volume import SeriesVolume

# Share of the overall percent each stage covers (inference dominates on a CPU; load/write are I/O).
STAGE_SPAN: dict[str, tuple[float, float]] = {
    "load": (0.0, 8.0),
    "preprocess": (8.0, 10.0),
    "infer": (10.0, 80.0),
    "postprocess": (80.0, 82.0),
    "write": (82.0, 92.0),
    "analyse": (92.0, 97.0),
    "deliver": (97.0, 100.0),
}

ProgressFn = Callable[[str, float], None]


def overall_percent(stage: str, fraction: float) -> float:
    start, end = STAGE_SPAN[stage]
    return start + (end - start) * min(1.0, max(0.0, fraction))


@dataclass
class DicomResult:
    """One DICOM result written (SEG, SR): what delivery sends, recorded in the job so it never guesses."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class Outputs:
    """What one run wrote, relative to its output folder, and the UIDs of the DICOM results."""

    files: list[Path] = field(default_factory=list)
    dicom: list[DicomResult] = field(default_factory=list)
    seg_sop_uid: str | None = None
    sr_sop_uid: str | None = None
    measurements: dict[str, Any] = field(default_factory=dict)
    warnings: list[T2Warning] = field(default_factory=list)  # skipped parts of a job that still finishes


def write_labels_nifti(labels: np.ndarray, affine_lps: np.ndarray, path: Path) -> None:
    """Canonical labels as NIfTI (RAS): the LPS affine with its first two rows negated."""
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    nib.save(nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), affine_ras), str(path))


def segment_volume(
    volume: SeriesVolume,
    segmenter: Segmenter,
    entry: ModelEntry,
    out_dir: Path,
    progress: ProgressFn,
    *,
    dicom_outputs: bool = True,
    labelmap_seg: bool = False,
    t2: bool = True,
    t2_parameters: dict[str, float] | None = None,
    t2_skip_first_echo: bool = False,
    priors: PriorLookup | None = None,
) -> Outputs:
    """Run preprocess → infer → postprocess → write → analyse on a loaded volume, writing into ``out_dir``.

    Re-running with the same input and model rewrites the same files with the same DICOM UIDs (idempotent).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = Outputs()

    progress("preprocess", 0.0)
    canonical = to_canonical(volume.image, volume.affine_lps)
    progress("preprocess", 1.0)

    try:
        model_labels = segmenter.predict(canonical.image, canonical.spacing, lambda f: progress("infer", f))
    except MemoryError:
        raise JobFailure(
            ErrorCode.GPU_OOM, "out of memory during inference", "Retry on a larger GPU/host."
        ) from None
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise JobFailure(
                ErrorCode.GPU_OOM, "the GPU ran out of memory", "Retry when the GPU is free.", permanent=False
            ) from None
        raise JobFailure(ErrorCode.SEGMENTATION_FAILED, f"inference failed: {exc}", permanent=False) from None

    progress("postprocess", 0.0)
    # the registry's label map and the steps of *entry* (image-aware ones read the canonical image)
    labels_canonical = segmenter.canonical_labels(
        model_labels, canonical.image, canonical.spacing, steps=entry.postprocess
    )
    # Laid out like the loaded slices ((i, j, k) in Fortran order = a (k, j, i) stack): the SEG's frames and
    # the NIfTI's voxel order are then plain reads of it, and one copy at most is made here.
    labels = np.asfortranarray(from_canonical(labels_canonical, canonical), dtype=np.uint8)
    if not labels.any():
        raise JobFailure(
            ErrorCode.SEGMENTATION_FAILED,
            "the model found no knee tissue in this series",
            "Check that the series is a knee MRI in a contrast the model was trained for.",
        )
    progress("postprocess", 1.0)

    # The analysis runs in its own process beside the writing (worker.analysis_process); progress is reported
    # from here only, so the "analyse" stage's time is what the analysis adds after the writing is done.
    analysis = start_analysis(labels, volume.spacing)
    progress("write", 0.0)
    labels_path = out_dir / "labels.nii.gz"
    write_labels_nifti(labels, volume.affine_lps, labels_path)
    outputs.files.append(labels_path)
    preview = out_dir / "preview.png"
    write_preview(volume.image, labels, volume.affine_lps, preview)
    outputs.files.append(preview)
    progress("write", 0.4)
    if dicom_outputs:
        seg_path = out_dir / "seg.dcm"
        seg = write_seg(volume, labels, entry.name, entry.version, seg_path, labelmap=labelmap_seg)
        outputs.seg_sop_uid = seg.sop_uid
        outputs.files.append(seg_path)
        outputs.dicom.append(DicomResult(seg_path, str(seg.dataset.SOPClassUID), seg.sop_uid))
    progress("write", 1.0)

    progress("analyse", 0.0)
    measurements = analysis.result()
    outputs.measurements = measurements
    if analysis.region_map is not None:
        # The subregions (openmsk.regions labels) in a file of their own; labels.nii.gz keeps the tissues.
        regions_path = out_dir / "regions.nii.gz"
        write_labels_nifti(analysis.region_map, volume.affine_lps, regions_path)
        outputs.files.append(regions_path)
    if t2 and isinstance(volume, MultiEchoVolume):
        # T2 before the report and SR, so both carry its statistics; missing parameters are a warning.
        t2_out = run_t2(
            volume,
            labels,
            measurements,
            entry.name,
            entry.version,
            out_dir,
            region_labels=analysis.region_map,  # T2 per subregion too, where the analysis made them
            overrides=t2_parameters,  # the routing rule's, for what the header lacks
            skip_first_echo=t2_skip_first_echo,
            dicom_outputs=dicom_outputs,
        )
        outputs.files.extend(t2_out.files)
        outputs.dicom.extend(DicomResult(*item) for item in t2_out.dicom)
        outputs.warnings.extend([t2_out.warning] if t2_out.warning else [])
    # Change since the prior visit (into the measurements, so report.json and the SR carry it), thickness
    # maps, region SEG and the maps' Secondary Captures (worker/region_outputs.py).
    add_change(measurements, volume, priors, entry.name, entry.version)
    region_out = write_region_outputs(
        volume,
        labels,
        analysis.region_map,
        measurements,
        entry.name,
        entry.version,
        out_dir,
        dicom_outputs=dicom_outputs,
        labelmap=labelmap_seg,
        faces=analysis.faces,  # the maps draw the values the report summarises
    )
    outputs.files.extend(region_out.files)
    outputs.dicom.extend(DicomResult(*item) for item in region_out.dicom)
    progress("analyse", 0.6)
    provenance = {**segmenter.provenance, "node_version": __version__}
    outputs.files.extend(write_report(measurements, provenance, out_dir))
    if dicom_outputs:
        sr_path = out_dir / "sr.dcm"
        sr = write_sr(
            seg.dataset,
            volume,
            measurements,
            entry.name,
            entry.version,
            sr_path,
            region_seg=region_out.region_seg,
        )
        outputs.sr_sop_uid = sr.sop_uid
        outputs.files.append(sr_path)
        outputs.dicom.append(DicomResult(sr_path, sr.sop_class_uid, sr.sop_uid))
    region_out.finish()  # the region SEG, written beside the maps and the SR
    manifest = out_dir / "manifest.json"
    write_atomic(
        manifest,
        json.dumps(
            {
                "provenance": provenance,
                "source": {"study_uid": volume.study_uid, "series_uid": volume.series_uid}
                if dicom_outputs
                else {},
                "seg_sop_uid": outputs.seg_sop_uid,
                "sr_sop_uid": outputs.sr_sop_uid,
                "files": sorted(p.name for p in outputs.files),
            },
            indent=2,
        ).encode(),
    )
    outputs.files.append(manifest)
    progress("analyse", 1.0)
    return outputs
