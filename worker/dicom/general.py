"""What every output of the node shares: its equipment identity, the source series it is made from, the write.

The SEG, the SR and the parametric maps name the same manufacturer and model, read the knee's laterality the
same way, fit text into LO/SH fields the same way and are saved atomically the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from openmsk.atomic import atomic_file
from openmsk.labels import LATERALITY
from worker.uids import derive_uid

if TYPE_CHECKING:
    import pydicom
    from pydicom.dataset import Dataset

__all__ = [
    "MANUFACTURER",
    "MANUFACTURER_MODEL_NAME",
    "HeaderVolume",
    "VolumeLike",
    "fit_text",
    "knee_laterality",
    "person_name",
    "reproducible_dimensions",
    "save_dataset",
    "series_number",
]

MANUFACTURER = "OpenMSK"
MANUFACTURER_MODEL_NAME = "OpenMSK Node"


class VolumeLike(Protocol):
    """What the writers need of a loaded series (``worker.volume.SeriesVolume`` has it)."""

    image: NDArray[Any]  # (n_cols, n_rows, n_slices), index (i, j, k)
    affine_lps: NDArray[Any]  # 4x4, voxel (i, j, k) -> patient LPS mm
    spacing: tuple[float, float, float]
    sources: list[pydicom.Dataset]  # sources[k] is slice k


@dataclass(frozen=True)
class HeaderVolume:
    """A series without its pixels: the geometry and the source headers, which is all the SEG writer reads of
    a volume. About 1 MB pickled against ~50 MB with the pixels, so a SEG can be written in another process
    (``worker.analysis_process``); ``image`` is a zero-stride stand-in of the right shape."""

    shape: tuple[int, int, int]
    affine_lps: NDArray[Any]
    spacing: tuple[float, float, float]
    sources: list[pydicom.Dataset]

    @classmethod
    def of(cls, volume: VolumeLike) -> HeaderVolume:
        """*volume*'s headers; the source datasets are new ones sharing the elements, less the pixel data."""
        from pydicom.dataset import Dataset

        sources = []
        for ds in volume.sources:
            # items() hands over the elements as read (still raw): no element is decoded for the copy
            header = Dataset({tag: element for tag, element in ds.items() if tag.group != 0x7FE0})
            header.file_meta = ds.file_meta
            sources.append(header)
        shape = tuple(int(n) for n in np.shape(volume.image))
        return cls((shape[0], shape[1], shape[2]), np.asarray(volume.affine_lps), volume.spacing, sources)

    @property
    def image(self) -> NDArray[Any]:
        return np.broadcast_to(np.float32(0), self.shape)


def knee_laterality(source: Dataset) -> str | None:
    """``"R"`` or ``"L"`` from the source's Laterality (series) or ImageLaterality, else ``None``."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword, "") or "").strip().upper()
        if value in LATERALITY:
            return value
    return None


def fit_text(value: str, limit: int) -> str:
    """Fit *value* into a DICOM LO/SH field of *limit* characters (backslash is the value separator).

    Plain truncation: an ellipsis character would not encode in the source's character set (often Latin-1).
    """
    return value.replace("\\", "/")[:limit]


def series_number(source: Dataset, offset: int) -> int:
    """The output's SeriesNumber: the source series' number + the kind's *offset*, so a PACS lists them together
    (a source without one counts as 0)."""
    return offset + int(source.get("SeriesNumber", 0) or 0)


def save_dataset(dataset: Dataset, out_path: str | Path) -> Path:
    """Write *dataset* as a DICOM file atomically: a reader never sees half a file under the final name. Its
    sequences are encoded by :mod:`worker.dicom.encoding` (the same bytes, in a fraction of pydicom's time)."""
    from worker.dicom.encoding import with_encoded_sequences

    path = Path(out_path)
    with atomic_file(path) as fh:
        with_encoded_sequences(dataset).save_as(fh, enforce_file_format=True)
    return path


def reproducible_dimensions(dataset: Dataset) -> None:
    """Replace the random DimensionOrganizationUID highdicom draws for a multi-frame object by one derived
    from the object's own (already derived) SOP Instance UID: a rerun then writes the same object, not one
    that differs from it only in a UID (which a PACS comparing instances would take for a change)."""
    uid = derive_uid(str(dataset.SOPInstanceUID), "dimension-organization")
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in dataset.get(keyword, []):
            if "DimensionOrganizationUID" in item:
                item.DimensionOrganizationUID = uid


def person_name(name: str) -> str:
    """A PN for a program: one family-name component; the trailing caret says that is on purpose."""
    name = fit_text(name.strip() or MANUFACTURER_MODEL_NAME, 63)
    return name if "^" in name else name + "^"
