"""The node's DICOM outputs are written with their sequences encoded by worker/dicom/encoding.py: every kind
must be byte for byte the file pydicom itself writes of the same object."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

import worker.dicom.encoding as encoding
from openmsk.phantom.echoes import generate_echoes, write_echo_series
from worker.analysis import analyse_knee
from worker.dicom.seg import write_seg
from worker.dicom.sr import write_sr
from worker.inputs import load_input
from worker.region_outputs import write_region_outputs
from worker.t2 import MultiEchoVolume
from worker.t2.stage import run_t2

MODEL, VERSION = "encoding-test", "1"
SEG, LABELMAP_SEG, SR, PM, SC, MR = (
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.66.7",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.30",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.4",
)


def _bytes(dataset: Dataset) -> bytes:
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Dataset, Dataset]]:
    """Every kind of output of one qDESS knee, as (the object built, what save_dataset handed pydicom)."""
    out = tmp_path_factory.mktemp("encoding")
    phantom = generate_echoes("qdess", seed=3, orientation="oblique", snr=40.0)
    volume = load_input(write_echo_series(phantom, out / "in")["dicom_dir"])
    assert isinstance(volume, MultiEchoVolume)
    labels = np.asarray(phantom.base.labels, dtype=np.uint8)
    seen: list[tuple[Dataset, Dataset]] = []
    real = encoding.with_encoded_sequences

    def spy(dataset: Dataset) -> Dataset:
        seen.append((dataset, real(dataset)))
        return seen[-1][1]

    mp = pytest.MonkeyPatch()
    mp.setattr(encoding, "with_encoded_sequences", spy)
    try:
        analysis = analyse_knee(labels, volume.spacing)
        assert analysis.region_map is not None
        measurements = analysis.measurements
        seg = write_seg(volume, labels, MODEL, VERSION, out / "seg.dcm")
        write_seg(volume, labels, MODEL, VERSION, out / "seg_labelmap.dcm", labelmap=True)
        rseg = write_seg(volume, analysis.region_map, MODEL, VERSION, out / "regions.dcm", regions=True)
        run_t2(volume, labels, measurements, MODEL, VERSION, out, region_labels=analysis.region_map)
        region_out = write_region_outputs(
            volume, labels, analysis.region_map, measurements, MODEL, VERSION, out, faces=analysis.faces
        )
        region_out.finish()
        write_sr(seg.dataset, volume, measurements, MODEL, VERSION, out / "sr.dcm", region_seg=rseg.dataset)
    finally:
        mp.undo()
    return seen


def test_every_output_is_the_file_pydicom_writes(written: list[tuple[Dataset, Dataset]]) -> None:
    kinds: dict[str, int] = {}
    for built, handed in written:
        sop_class = str(built.SOPClassUID)
        kinds[sop_class] = kinds.get(sop_class, 0) + 1
        assert _bytes(handed) == _bytes(built), sop_class
    # the tissue, label-map and region SEGs, the SR, the T2 map, its MR images and the thickness SCs
    assert kinds.get(SEG) == 2 and kinds.get(LABELMAP_SEG) == 1, kinds
    assert kinds.get(SR) == 1 and kinds.get(PM) == 1, kinds
    assert kinds.get(SC, 0) >= 1 and kinds.get(MR, 0) >= 1, kinds


def test_the_large_sequences_are_encoded_here(written: list[tuple[Dataset, Dataset]]) -> None:
    """The speed comes from the SEG's and PM's per-frame items and the SR's content tree: for those objects
    the fast path must be taken, not silently left to pydicom."""
    for built, handed in written:
        if str(built.SOPClassUID) in (SEG, LABELMAP_SEG, SR, PM):
            assert handed is not built, (
                built.SOPClassUID,
                built.get("SeriesDescription"),
                len(built.get("PerFrameFunctionalGroupsSequence", [])),
            )
            keyword = (
                "ContentSequence" if str(built.SOPClassUID) == SR else "PerFrameFunctionalGroupsSequence"
            )
            assert handed.get_item(keyword).is_raw, keyword


@pytest.mark.parametrize(
    ("element", "why"),
    [
        (("CodeMeaning", "Knorpel, äußerer"), "non-ASCII"),
        (("PatientName", "Doe^Jane"), "VR PN"),
    ],
)
def test_what_it_does_not_encode_is_left_to_pydicom(element: tuple[str, Any], why: str) -> None:
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SEG, "1.2.3.4"
    ds.ReferencedImageSequence = [item]
    keyword, value = element
    setattr(item, keyword, value)
    with pytest.raises(encoding.NotPlain, match=why):
        encoding.encode_items(ds.ReferencedImageSequence)
    handed = encoding.with_encoded_sequences(ds)
    assert handed is ds and _bytes(handed) == _bytes(ds)


def test_a_written_seg_reads_back_as_pydicom_wrote_it(tmp_path: Path) -> None:
    """The bytes go to disk through save_dataset: what a PACS gets reads back item for item."""
    phantom = generate_echoes("qdess", seed=4, orientation="sagittal", snr=40.0)
    volume = load_input(write_echo_series(phantom, tmp_path / "in")["dicom_dir"])
    labels = np.asarray(phantom.base.labels, dtype=np.uint8)
    seg = write_seg(volume, labels, MODEL, VERSION, tmp_path / "seg.dcm")
    assert seg.dataset is not None
    assert (tmp_path / "seg.dcm").read_bytes() == _bytes(seg.dataset)
    back = pydicom.dcmread(tmp_path / "seg.dcm")
    assert len(back.PerFrameFunctionalGroupsSequence) == int(back.NumberOfFrames) > 10
