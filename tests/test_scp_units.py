"""The SCP's pure parts: data-set walking, file meta, UIDs, durable writes, routing rules, completion."""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from scp.completion import CompletionTracker
from scp.fastpath import encode_c_store_rsp, parse_command
from scp.routing import RoutingError, RoutingRules, SeriesInfo
from scp.storage import (
    SPARE_TRAILER,
    SPARE_TRAILER_MAGIC,
    InstanceHeader,
    InstanceStore,
    InvalidInstance,
    file_meta,
    is_valid_uid,
    read_file_meta,
    read_header,
)
from tests.mr_series import mr_dataset
from tests.processes import wait_for

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
REPO = Path(__file__).resolve().parents[1]


def encoded(ds: pydicom.Dataset, transfer_syntax: str) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = transfer_syntax == IMPLICIT
    buffer.is_little_endian = transfer_syntax != BIG
    write_dataset(buffer, ds)
    raw = buffer.getvalue()
    if transfer_syntax == DEFLATED:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = compressor.compress(raw) + compressor.flush()
    return raw


@pytest.fixture
def dataset() -> pydicom.Dataset:
    ds = mr_dataset(0, generate_uid(), generate_uid(), b"\x01\x02" * 64, 8, 8, description="Knie PD 3D")
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    item.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = Sequence([item, item])
    return ds


@pytest.mark.parametrize("transfer_syntax", [IMPLICIT, EXPLICIT, BIG, DEFLATED])
def test_read_header_picks_out_uids_and_routing_attributes(
    dataset: pydicom.Dataset, transfer_syntax: str
) -> None:
    header = read_header(encoded(dataset, transfer_syntax), transfer_syntax)
    assert header == InstanceHeader(
        sop_class_uid=dataset.SOPClassUID,
        sop_instance_uid=dataset.SOPInstanceUID,
        study_uid=dataset.StudyInstanceUID,
        series_uid=dataset.SeriesInstanceUID,
        modality="MR",
        body_part="KNEE",
        series_description="Knie PD 3D",
        mr_acquisition_type="3D",
        image_type=("ORIGINAL", "PRIMARY", "M", "ND"),
    )


@pytest.mark.parametrize("transfer_syntax", [IMPLICIT, EXPLICIT, BIG])
def test_truncated_data_sets_are_refused(dataset: pydicom.Dataset, transfer_syntax: str) -> None:
    """A cut anywhere inside an element (here: every byte of the pixel data element and a sequence) is caught.

    A cut exactly between two elements leaves a shorter but well-formed data set, which no parser can tell.
    """
    raw = encoded(dataset, transfer_syntax)
    pixel_element = 12 + len(dataset.PixelData) if transfer_syntax != IMPLICIT else 8 + len(dataset.PixelData)
    for cut in range(1, pixel_element):
        with pytest.raises(InvalidInstance, match="truncated"):
            read_header(raw[:-cut], transfer_syntax)
    sequence_at = raw.index(b"\x08\x00\x40\x11" if transfer_syntax != BIG else b"\x00\x08\x11\x40")
    for cut_at in range(sequence_at + 1, sequence_at + 40):
        with pytest.raises(InvalidInstance):
            read_header(raw[:cut_at], transfer_syntax)


@pytest.mark.parametrize(
    "missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
)
def test_missing_uids_are_refused(dataset: pydicom.Dataset, missing: str) -> None:
    delattr(dataset, missing)
    with pytest.raises(InvalidInstance, match=f"missing {missing}"):
        read_header(encoded(dataset, EXPLICIT), EXPLICIT)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize(
    "value", ["..", "1.2.3/../../etc", "1.2.03", "1..2", "/tmp/x", "1.2.3.", "1" * 65, "1.2.3a"]
)
def test_uids_that_break_the_grammar_never_become_paths(dataset: pydicom.Dataset, value: str) -> None:
    assert not is_valid_uid(value)
    dataset.SeriesInstanceUID = value
    with pytest.raises(InvalidInstance, match="SeriesInstanceUID is not a valid UID"):
        read_header(encoded(dataset, EXPLICIT), EXPLICIT)


def test_uid_grammar() -> None:
    assert (
        is_valid_uid("1.2.840.10008.5.1.4.1.1.4") and is_valid_uid("0.0") and is_valid_uid("2.25." + "9" * 59)
    )
    assert not is_valid_uid("１.２") and not is_valid_uid("") and not is_valid_uid("2.25." + "9" * 60)


def test_garbage_is_refused() -> None:
    with pytest.raises(InvalidInstance):
        read_header(b"this is not DICOM at all, just some text", EXPLICIT)
    with pytest.raises(InvalidInstance):
        read_header(b"", EXPLICIT)
    with pytest.raises(InvalidInstance, match="inflated"):
        read_header(b"\xff" * 50, DEFLATED)


def test_file_meta_makes_a_file_pydicom_reads_back(dataset: pydicom.Dataset, tmp_path: Path) -> None:
    raw = encoded(dataset, EXPLICIT)
    path = tmp_path / "x.dcm"
    path.write_bytes(
        file_meta(dataset.SOPClassUID, dataset.SOPInstanceUID, EXPLICIT, "SCANNER1", "OPENMSK") + raw
    )
    back = pydicom.dcmread(path)
    assert back.SOPInstanceUID == dataset.SOPInstanceUID
    assert back.PixelData == dataset.PixelData
    assert back.file_meta.TransferSyntaxUID == EXPLICIT
    assert back.file_meta.SourceApplicationEntityTitle == "SCANNER1"
    meta = read_file_meta(path)
    assert meta[0x00020016] == "SCANNER1" and meta[0x00020018] == "OPENMSK"


def test_store_writes_atomically_replaces_duplicates_and_leaves_no_partials(
    dataset: pydicom.Dataset, tmp_path: Path
) -> None:
    store = InstanceStore(tmp_path)
    header = read_header(encoded(dataset, EXPLICIT), EXPLICIT)
    first = store.write(header, [b"first"])
    second = store.write(header, [b"second", memoryview(b"-copy")])
    assert (
        first
        == second
        == tmp_path / "incoming" / header.study_uid / header.series_uid / (header.sop_instance_uid + ".dcm")
    )
    assert second.read_bytes() == b"second-copy"
    assert store.sop_uids(header.study_uid, header.series_uid) == [header.sop_instance_uid]
    assert list((tmp_path / "incoming" / ".partial").iterdir()) == []
    shutil.rmtree(
        second.parent.parent
    )  # retention removed the study meanwhile: the next write makes it again
    assert store.write(header, [b"third"]).read_bytes() == b"third"


def test_recovery_moves_complete_unrenamed_files_into_place_and_deletes_the_rest(
    dataset: pydicom.Dataset, tmp_path: Path
) -> None:
    """A crash after the sync but before the rename leaves an acknowledged file under its temporary name."""
    store = InstanceStore(tmp_path)
    raw = encoded(dataset, EXPLICIT)
    content = file_meta(dataset.SOPClassUID, dataset.SOPInstanceUID, EXPLICIT, "A", "B") + raw
    sop = dataset.SOPInstanceUID
    (store.partial / f"{sop}.{zlib.crc32(content):08x}.7.1").write_bytes(content)  # complete
    (store.partial / f"1.2.3.{zlib.crc32(content):08x}.7.2").write_bytes(content[:-10])  # cut short
    (store.partial / f"1.2.4.{zlib.crc32(b'x'):08x}.7.3").write_bytes(content)  # checksum does not match
    (store.partial / "stray").write_bytes(b"junk")
    assert store.recover_partial() == (1, 3)
    target = tmp_path / "incoming" / dataset.StudyInstanceUID / dataset.SeriesInstanceUID / f"{sop}.dcm"
    assert target.read_bytes() == content
    assert list(store.partial.iterdir()) == []


def _prewritten(content: bytes, size: int, trailer: bool = True, crc: int | None = None) -> bytes:
    """What a pre-written spare holds after the instance's fdatasync: data, zeros, the trailer at the end."""
    body = content + bytes(size - len(content) - SPARE_TRAILER.size)
    if not trailer:
        return body + bytes(SPARE_TRAILER.size)
    return body + SPARE_TRAILER.pack(
        SPARE_TRAILER_MAGIC, len(content), zlib.crc32(content) if crc is None else crc
    )


def test_writes_into_prewritten_spares_leave_exactly_the_instance(
    dataset: pydicom.Dataset, tmp_path: Path
) -> None:
    store = InstanceStore(tmp_path)
    store.start()
    try:
        raw = encoded(dataset, EXPLICIT)
        header = read_header(raw, EXPLICIT)
        meta = file_meta(header.sop_class_uid, header.sop_instance_uid, EXPLICIT)
        store.write(header, [meta, raw])  # the first write tells the spares how large instances are
        spares = store._spares
        wait_for(lambda: len(spares._ready) == spares.keep and spares._ready[0][2], 10, "pre-written spares")
        assert all(size == spares.size > len(raw) for _, _, size in spares._ready)
        for copy in range(3):
            path = store.write(header, [meta, raw + bytes(2 * copy)])
            assert path.read_bytes() == meta + raw + bytes(2 * copy)  # no zeros, no trailer left
        assert [p for p in store.partial.iterdir() if not p.name.startswith("spare.")] == []
    finally:
        store.close()
    assert list(store.partial.iterdir()) == []


def test_recovery_of_prewritten_spares_before_their_rename_or_cut(
    dataset: pydicom.Dataset, tmp_path: Path
) -> None:
    """A crash right after the fdatasync leaves the instance in a spare (trailer) or an uncut checksum file."""
    store = InstanceStore(tmp_path)
    raw = encoded(dataset, EXPLICIT)
    content = file_meta(dataset.SOPClassUID, dataset.SOPInstanceUID, EXPLICIT, "A", "B") + raw
    folder = tmp_path / "incoming" / dataset.StudyInstanceUID / dataset.SeriesInstanceUID
    size = 64 << 10
    (store.partial / "spare.1.2.3").write_bytes(_prewritten(content, size))  # acknowledged, never renamed
    assert store.recover_partial() == (1, 0)
    assert (folder / f"{dataset.SOPInstanceUID}.dcm").read_bytes() == content
    (folder / f"{dataset.SOPInstanceUID}.dcm").unlink()
    uncut = f"{dataset.SOPInstanceUID}.{zlib.crc32(content):08x}.7.1"
    (store.partial / uncut).write_bytes(_prewritten(content, size))  # renamed, not yet cut
    (store.partial / "spare.1.2.4").write_bytes(bytes(size))  # never used
    (store.partial / "spare.1.2.5").write_bytes(_prewritten(content, size, crc=1))  # torn write
    (store.partial / "spare.1.2.6").write_bytes(_prewritten(content[:-10], size, trailer=False))
    assert store.recover_partial() == (1, 3)
    assert (folder / f"{dataset.SOPInstanceUID}.dcm").read_bytes() == content
    assert list(store.partial.iterdir()) == []


def test_a_durable_write_not_yet_moved_into_place_is_recovered_and_a_refused_one_leaves_nothing(
    dataset: pydicom.Dataset, tmp_path: Path
) -> None:
    """The SCP answers Success between write_durable and finish (the renames run while the sender reads its
    next instance): a crash in that window must still keep the instance, pre-written spare or not."""
    raw = encoded(dataset, EXPLICIT)
    header = read_header(raw, EXPLICIT)
    meta = file_meta(header.sop_class_uid, header.sop_instance_uid, EXPLICIT)
    folder = tmp_path / "incoming" / header.study_uid / header.series_uid
    store = InstanceStore(tmp_path)
    store.start()
    try:
        store.write(header, [meta, raw])  # sizes the spares
        spares = store._spares
        wait_for(lambda: len(spares._ready) == spares.keep and spares._ready[0][2], 10, "pre-written spares")
        (folder / f"{header.sop_instance_uid}.dcm").unlink()
        crashed = store.write_durable(header, [meta, raw])
        assert crashed.prewritten and not (folder / f"{header.sop_instance_uid}.dcm").exists()
        crashed.close()  # the process dies here: no rename, no cut
        refused = store.write_durable(header, [meta, raw + b"xx"])
        refused.discard()
        assert not refused.spare.exists() and not refused.temp.exists()
        finished = store.write_durable(header, [meta, raw])
        assert finished.finish().read_bytes() == meta + raw
        (folder / f"{header.sop_instance_uid}.dcm").unlink()
    finally:
        store.close()
    again = InstanceStore(tmp_path, fsync=True)
    again.prewrite = False
    unprewritten = again.write_durable(header, [meta, raw])  # renamed to its checksum name and fsync'd
    assert unprewritten.renamed and not unprewritten.prewritten
    assert again.recover_partial() == (2, 0)  # the crashed spare (by its trailer) and the checksum file
    assert (folder / f"{header.sop_instance_uid}.dcm").read_bytes() == meta + raw
    assert list(again.partial.iterdir()) == []


@pytest.mark.parametrize("comment", [None, "data set truncated", "odd"])
@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.4.12345"])  # odd and even lengths
def test_c_store_response_matches_pynetdicoms_own_encoding(uid: str, comment: str | None) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 513
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    primitive.AffectedSOPInstanceUID = uid
    primitive.Status = 0xC000 if comment else 0
    primitive.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    mine = encode_c_store_rsp(513, primitive.AffectedSOPClassUID, uid, primitive.Status, comment)
    assert mine == encode(message.command_set, True, True)
    assert parse_command(mine)[0x0900] == primitive.Status.to_bytes(2, "little")


# ------------------------------------------------------------------------------------------------- routing


def knee(**changes: object) -> SeriesInfo:
    values: dict[str, object] = {
        "study_uid": "1.2",
        "series_uid": "1.2.3",
        "modality": "MR",
        "body_part": "KNEE",
        "series_description": "PD SPACE SAG",
        "mr_acquisition_type": "3D",
        "image_type": ("ORIGINAL", "PRIMARY", "M"),
        "instances": 160,
        "calling_ae": "SCANNER1",
        "called_ae": "OPENMSK",
    }
    values.update(changes)
    return SeriesInfo(**values)  # type: ignore[arg-type]


def test_default_rules_send_3d_knee_mr_to_the_default_model_and_ignore_the_rest() -> None:
    rules = RoutingRules.load(REPO / "scp" / "routing.toml", "nnunet_fullres")
    decision = rules.route(knee())
    assert decision.rule is not None and decision.rule.name == "knee-3d-mr"
    assert decision.models == ("nnunet_fullres",)
    assert decision.rule.destinations == ("orthanc",)
    by_description = rules.route(knee(body_part="", series_description="PD 3D KNEE sag"))
    assert by_description.rule is not None and by_description.rule.name == "knee-3d-mr-by-description"
    for other in (
        knee(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        knee(mr_acquisition_type="2D"),
        knee(modality="CT"),
        knee(body_part="SHOULDER"),
        knee(instances=3),
        knee(modality="SEG", mr_acquisition_type=""),
    ):
        assert rules.route(other).ignore, other


def test_rules_explain_every_mismatch() -> None:
    rules = RoutingRules.from_dict(
        {
            "rules": [
                {
                    "name": "strict",
                    "modality": ["MR"],
                    "series_description": "(?i)dess",
                    "calling_ae": ["SCANNER9"],
                    "called_ae": "OPENMSK",
                    "image_type_includes": ["ORIGINAL"],
                    "min_instances": 200,
                    "models": ["a", "b"],
                    "priority": "urgent",
                },
                {"name": "fallback", "model": "default"},
            ]
        },
        default_model="nnunet_fullres",
    )
    decision = rules.route(knee())
    assert decision.rule is not None and decision.rule.name == "fallback"
    assert decision.models == ("nnunet_fullres",)
    reasons = dict((rule.name, why) for rule, why in decision.verdicts)["strict"]
    assert any("SeriesDescription" in r for r in reasons)
    assert any("calling AE is 'SCANNER1'" in r for r in reasons)
    assert any("fewer than 200" in r for r in reasons)
    assert not any("called AE" in r for r in reasons)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"name": "x"}, "needs either models"),
        ({"name": "x", "ignore": True, "model": "a"}, "needs either models"),
        ({"name": "x", "model": "a", "modality": []}, "'modality' must be"),
        ({"name": "x", "model": "a", "series_description": "("}, "not a valid regular expression"),
        ({"name": "x", "model": "a", "priority": "now"}, "'priority' must be"),
        ({"name": "x", "model": "a", "bodypart": "KNEE"}, "unknown key"),
        ({"name": "x", "model": "nope"}, "unknown model"),
        ({"name": "x", "model": "a", "min_instances": -1}, "'min_instances'"),
    ],
)
def test_bad_rules_are_reported_with_the_rule(rule: dict, message: str) -> None:
    with pytest.raises(RoutingError, match=message):
        RoutingRules.from_dict({"rules": [rule]}, "a", known_models=["a"])


# ---------------------------------------------------------------------------------------------- completion


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def header(series: str = "1.2.3") -> InstanceHeader:
    return InstanceHeader("1.2.840.10008.5.1.4.1.1.4", generate_uid(), "1.2", series)


def test_series_completes_quiet_seconds_after_its_association_is_released() -> None:
    clock = Clock()
    tracker = CompletionTracker(quiet_s=2.0, timeout_s=30.0, clock=clock)
    tracker.instance_stored(1, header(), "A", "OPENMSK")
    clock.now += 10
    assert tracker.pop_complete() == []  # association still open: only the timeout applies
    tracker.association_ended(1, released=True)
    assert tracker.pop_complete()[0].series_uid == "1.2.3"  # quiet time already passed at release


def test_series_waits_for_every_association_and_the_quiet_time() -> None:
    clock = Clock()
    tracker = CompletionTracker(quiet_s=2.0, timeout_s=30.0, clock=clock)
    tracker.instance_stored(1, header(), "A", "OPENMSK")
    tracker.instance_stored(2, header(), "A", "OPENMSK")
    tracker.association_ended(1, released=True)
    clock.now += 5
    assert tracker.pop_complete() == []
    tracker.association_ended(2, released=True)
    clock.now += 1
    tracker.instance_stored(3, header(), "A", "OPENMSK")  # a third association sends more
    tracker.association_ended(3, released=True)
    clock.now += 1.9
    assert tracker.pop_complete() == []
    clock.now += 0.2
    done = tracker.pop_complete()
    assert len(done) == 1 and done[0].received == 3


def test_open_or_aborted_associations_fall_back_to_the_timeout() -> None:
    clock = Clock()
    tracker = CompletionTracker(quiet_s=2.0, timeout_s=30.0, clock=clock)
    tracker.instance_stored(1, header("1.1"), "A", "OPENMSK")
    tracker.instance_stored(2, header("2.2"), "A", "OPENMSK")
    tracker.association_ended(2, released=False)
    clock.now += 29.9
    assert tracker.pop_complete() == []
    clock.now += 0.2
    assert {s.series_uid for s in tracker.pop_complete()} == {"1.1", "2.2"}
