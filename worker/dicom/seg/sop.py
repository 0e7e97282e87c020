"""DICOM Segmentation (SEG) of the knee labels, for the PACS and any DICOM viewer.

Two SEGs are written from the same code: the tissues (label map 1-9) and, with ``regions=True``, the
cartilage subregions of :mod:`openmsk.regions` (label map 11-32, content label ``KNEE_REGIONS``, its own
series number and UIDs), so a PACS user sees the regions the report measures.

One segment per tissue (or region) present in the label map (absent ones are left out, so a viewer lists only
what was found), coded with the SNOMED CT terms of :mod:`openmsk.labels`, coloured with the same colours as the preview
(RecommendedDisplayCIELabValue), and identified as the AUTOMATIC output of the model and version that produced
it. The SEG shares the source series' study and frame of reference and references every source instance.

BINARY is the default because viewers older than the Label Map Segmentation SOP class (added to DICOM in 2024;
2022-era OHIF, Slicer, PACS viewers) do not display LABELMAP objects; ``labelmap=True`` writes the Label Map
Segmentation SOP class instead, one 8-bit frame per slice instead of one 1-bit frame per slice and segment.

The Series and SOP Instance UIDs are derived from (source SeriesInstanceUID, model name, model version, type),
so rerunning a model on a series replaces the earlier SEG in the PACS instead of adding a second one.
"""

from __future__ import annotations

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
from worker.dicom.seg.content import (
    CONTENT_LABEL,
    REGION_CONTENT_LABEL,
    REGION_KINDS,
    REGION_SEG_SERIES_NUMBER_OFFSET,
    SEG_SERIES_NUMBER_OFFSET,
    TISSUE_KINDS,
    SegmentKind,
    segment_description,
)
from worker.uids import derive_uid

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["SegResult", "seg_header", "seg_uids", "write_seg"]

#: SOP Class UIDs of the two segmentation types (pydicom 3.0 does not name the 2024 Label Map one)
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"


@dataclass(frozen=True)
class SegResult:
    """What :func:`write_seg` wrote.

    ``segments`` holds the tissue (or region) names in segment-number order: segment ``n`` is
    ``segments[n - 1]``.
    """

    series_uid: str
    sop_uid: str
    segments: list[str]
    path: Path | None = None
    segment_numbers: dict[str, int] = field(default_factory=dict)
    labelmap: bool = False
    regions: bool = False
    #: the SEG as written, for the SR (which then need not read the file back)
    dataset: Dataset | None = field(default=None, repr=False, compare=False)


def seg_uids(
    source_series_uid: str,
    model_name: str,
    model_version: str,
    *,
    labelmap: bool = False,
    regions: bool = False,
) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SEG of *model_name* *model_version* on a source series.

    The segmentation type takes part: a BINARY and a LABELMAP SEG are different SOP classes and must never
    share a SOP Instance UID. The region SEG is another object (another series) than the tissue SEG.
    """
    kind = "seg-labelmap" if labelmap else "seg-binary"
    if regions:
        kind = "regions-" + kind
    return (
        derive_uid(source_series_uid, model_name, model_version, kind, "series"),
        derive_uid(source_series_uid, model_name, model_version, kind, "instance"),
    )


def _check(volume: VolumeLike, labels: NDArray[Any]) -> NDArray[Any]:
    labels = np.asarray(labels)
    shape = tuple(np.shape(volume.image))
    if labels.shape != shape:
        raise ValueError(f"labels shape {labels.shape} differs from the image shape {shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError("labels must lie in 0..255")
        labels = labels.astype(np.uint8)
    if len(volume.sources) != shape[2]:
        raise ValueError(f"{len(volume.sources)} source instances for {shape[2]} slices")
    series = {str(ds.SeriesInstanceUID) for ds in volume.sources}
    if len(series) != 1:
        raise ValueError("the source instances belong to more than one series")
    for k, ds in enumerate(volume.sources):
        # Rows are along j and columns along i: a slice's 2D array is labels[:, :, k] transposed.
        if (int(ds.Rows), int(ds.Columns)) != (shape[1], shape[0]):
            raise ValueError(
                f"source slice {k} is {ds.Rows}x{ds.Columns}, the labels are {shape[1]}x{shape[0]}"
            )
    return labels


def _segments_present(labels: NDArray[np.uint8], regions: bool) -> list[SegmentKind]:
    """The kinds of the table found in *labels*, in label order: segment ``n`` is the ``n``-th of them."""
    table = REGION_KINDS if regions else TISSUE_KINDS
    # One comparison per label beats np.bincount/np.unique here (3 ms each on a knee against 0.2 s for those)
    present = [kind for value, kind in table.items() if (labels == value).any()]
    if not present:
        what = "region" if regions else "tissue"
        raise ValueError(f"no {what} of the table is present in the labels: nothing to segment")
    return present


def seg_header(
    volume: VolumeLike,
    labels: NDArray[Any],
    model_name: str,
    model_version: str,
    *,
    labelmap: bool = False,
    regions: bool = False,
) -> Dataset:
    """What a referencing object needs of the SEG :func:`write_seg` writes for the same arguments, without
    writing it: SOP class, study/series/instance UIDs, the segment table (numbers and labels; a Label Map
    SEG's background segment 0 is left out, nothing references it) and the referenced source series.

    The SR is built from it while the SEG itself is still being written beside it (``worker.region_outputs``);
    both come from the same UIDs and the same :func:`_segments_present`, so they agree.
    """
    from pydicom.dataset import Dataset

    if not model_name or not model_version:
        raise ValueError("model_name and model_version must be non-empty")
    labels = _check(volume, labels)
    source0 = volume.sources[0]
    series_uid, sop_uid = seg_uids(
        str(source0.SeriesInstanceUID), model_name, model_version, labelmap=labelmap, regions=regions
    )
    header = Dataset()
    header.SOPClassUID = LABEL_MAP_SEGMENTATION_STORAGE if labelmap else SEGMENTATION_STORAGE
    header.SOPInstanceUID = sop_uid
    header.StudyInstanceUID = source0.StudyInstanceUID
    header.SeriesInstanceUID = series_uid
    segments = []
    for number, kind in enumerate(_segments_present(labels, regions), start=1):
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = kind.display_name
        segments.append(item)
    header.SegmentSequence = segments
    referenced = Dataset()
    referenced.SeriesInstanceUID = source0.SeriesInstanceUID
    header.ReferencedSeriesSequence = [referenced]
    return header


def write_seg(
    volume: VolumeLike,
    labels: NDArray[Any],
    model_name: str,
    model_version: str,
    out_path: str | Path,
    *,
    labelmap: bool = False,
    regions: bool = False,
    content_creator: str = "OpenMSK Node",
    device_serial_number: str = "1",
) -> SegResult:
    """Write the SEG of *labels* (canonical OpenMSK labels on the grid of *volume*) to *out_path*.

    Parameters
    ----------
    volume: VolumeLike
        The source series; its ``sources`` give the patient, study, frame of reference and per-slice geometry.
    labels: numpy.ndarray
        Integer label map, same shape and index order (i, j, k) as ``volume.image``. Values not in
        :data:`openmsk.labels.TISSUES` are ignored.
    model_name, model_version: str
        Identify the algorithm (SegmentationAlgorithmIdentificationSequence) and take part in the UIDs.
    out_path: str | pathlib.Path
        Target file; written atomically (temporary file, then rename), parent folders created.
    labelmap: bool
        Write a Label Map Segmentation (one 8-bit frame per slice) instead of a BINARY one.
    regions: bool
        *labels* is the subregion label map (:data:`openmsk.regions.REGIONS`): write the region SEG.
    content_creator: str
        ContentCreatorName (a person name in DICOM; the node names itself).

    Returns
    -------
    SegResult
        UIDs, tissue names in segment order and the path written.

    Raises
    ------
    ValueError
        When the labels do not match the volume, or no tissue (region) of the table is present (a SEG needs a
        segment).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian

    if not model_name or not model_version:
        raise ValueError("model_name and model_version must be non-empty")
    labels = _check(volume, labels)
    source0 = volume.sources[0]

    present = _segments_present(labels, regions)
    # Segment numbers are consecutive from 1 (the standard requires it), in label order; other values -> 0.
    # Where the labels present are 1..n already (every tissue found, the usual case), they are the numbers.
    numbered = [t.label for t in present] == list(range(1, len(present) + 1))
    if not (numbered and int(labels.max()) <= len(present)):
        lut = np.zeros(256, dtype=np.uint8)
        for number, tissue in enumerate(present, start=1):
            lut[tissue.label] = number
        labels = lut[labels]
    # (i, j, k) -> (frame k, row j, column i), the frame layout highdicom expects. Contiguous, because
    # highdicom compares every frame with every segment number: on strided frames that costs more than the
    # copy (none is made for labels in Fortran order, as the pipeline lays them out).
    pixels = np.ascontiguousarray(labels.transpose(2, 1, 0))

    algorithm = hd.AlgorithmIdentificationSequence(
        name=fit_text(model_name, 64),
        family=codes.DCM.ArtificialIntelligence,
        version=fit_text(model_version, 64),
        source=MANUFACTURER_MODEL_NAME,
    )
    laterality = knee_laterality(source0)
    descriptions = [segment_description(n, t, algorithm, laterality) for n, t in enumerate(present, start=1)]

    series_uid, sop_uid = seg_uids(
        str(source0.SeriesInstanceUID), model_name, model_version, labelmap=labelmap, regions=regions
    )
    offset = REGION_SEG_SERIES_NUMBER_OFFSET if regions else SEG_SERIES_NUMBER_OFFSET
    number = series_number(source0, offset)
    what = "knee cartilage regions" if regions else "knee segmentation"
    seg = hd.seg.Segmentation(
        source_images=volume.sources,
        pixel_array=pixels,
        segmentation_type=(
            hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY
        ),
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=__version__,
        device_serial_number=device_serial_number,
        content_label=REGION_CONTENT_LABEL if regions else CONTENT_LABEL,
        content_description=fit_text(f"{model_name} {model_version} {what}", 64),
        content_creator_name=person_name(content_creator),
        series_description=fit_text(f"OpenMSK {what} ({model_name} {model_version})", 64),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        # Empty frames carry nothing; leaving them out is most of the size and time saved on a knee.
        omit_empty_frames=True,
    )
    # General Series attribute that highdicom does not copy; PACS routing rules and viewers' hanging protocols
    # use it.
    if source0.get("BodyPartExamined"):
        seg.BodyPartExamined = source0.BodyPartExamined
    reproducible_dimensions(seg)
    path = save_dataset(seg, out_path)
    return SegResult(
        series_uid=series_uid,
        sop_uid=sop_uid,
        segments=[t.name for t in present],
        path=path,
        segment_numbers={t.name: n for n, t in enumerate(present, start=1)},
        labelmap=labelmap,
        regions=regions,
        dataset=seg,
    )
