"""Receiving with real peers: dcmtk's echoscu/storescu (plain, compressed, TLS), a pynetdicom SCU for
malformed input, concurrent senders, and the security checks (allowlist, called AE, TLS, association limit,
disk guard).
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from openmsk.config import Settings
from openmsk.managed.process import free_port
from scp.fastpath import FastStoreReceiver
from scp.server import StorageSCP
from tests.mr_series import mr_dataset, write_mr_series

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
StartSCP = Callable[..., StorageSCP]


def dcmtk(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def start_scp(settings: Settings) -> Iterator[StartSCP]:
    """Start StorageSCPs on the test's DATA_DIR and Redis; all are stopped at the end."""
    started: list[StorageSCP] = []

    def start(fast_path: bool = True, **overrides: object) -> StorageSCP:
        values = {"series_quiet_s": 0.3, "series_timeout_s": 5.0, "min_free_disk_mb": 0, **overrides}
        scp = StorageSCP(settings.model_copy(update=values), fast_path=fast_path).start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file (what follows the File Meta Information)."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def stored_path(data_dir: Path, path: Path) -> Path:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return data_dir / "incoming" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_echoscu_verification(start_scp: StartSCP) -> None:
    scp = start_scp()
    result = dcmtk("echoscu", "-aet", "ECHOER", "-aec", "OPENMSK", "127.0.0.1", str(scp.port))
    assert result.returncode == 0, result.stderr


CODECS = {  # name: (converter, storescu option that proposes the compressed transfer syntax)
    "uncompressed": (None, "-x="),
    "jpeg-ls-lossless": ("dcmcjpls", "-xt"),
    "rle": ("dcmcrle", "-xr"),
    "jpeg-lossless": ("dcmcjpeg", "-xs"),
}


@pytest.mark.parametrize("codec", list(CODECS))
def test_storescu_instances_are_stored_exactly_as_sent(
    start_scp: StartSCP, data_dir: Path, tmp_path: Path, codec: str
) -> None:
    scp = start_scp(fast_path=codec != "rle")  # one codec through pynetdicom's stock path, for comparison
    source = write_mr_series(tmp_path / "plain", 3, 48, 40)
    tool, propose = CODECS[codec]
    if tool is not None:
        (tmp_path / codec).mkdir()
        converted = []
        for path in source:
            target = tmp_path / codec / path.name
            result = dcmtk(tool, str(path), str(target))
            assert result.returncode == 0, result.stderr
            converted.append(target)
        source = converted
    sent_ts = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in source}
    if tool is not None:
        assert sent_ts != {ExplicitVRLittleEndian}
    result = dcmtk(
        "storescu",
        propose,
        "-aet",
        "SENDER",
        "-aec",
        "OPENMSK",
        "127.0.0.1",
        str(scp.port),
        *map(str, source),
    )
    assert result.returncode == 0, result.stderr
    for path in source:
        stored = stored_path(data_dir, path)
        assert dataset_bytes(stored) == dataset_bytes(path)  # byte for byte: no re-encoding
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert str(meta.TransferSyntaxUID) in sent_ts
        assert meta.SourceApplicationEntityTitle == "SENDER"
    assert [
        p for p in files_under(data_dir / "incoming" / ".partial") if not p.name.startswith("spare.")
    ] == []


STORAGE_CLASSES = {  # name: (SOP Class UID, Modality)
    "CT": ("1.2.840.10008.5.1.4.1.1.2", "CT"),
    "Enhanced MR": ("1.2.840.10008.5.1.4.1.1.4.1", "MR"),
    "SEG": ("1.2.840.10008.5.1.4.1.1.66.4", "SEG"),
    "Comprehensive SR": ("1.2.840.10008.5.1.4.1.1.88.33", "SR"),
    "Secondary Capture": ("1.2.840.10008.5.1.4.1.1.7", "OT"),
}
LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"  # newer than dcmtk 3.6.7: sent with pynetdicom


def minimal_instance(folder: Path, name: str, sop_class: str, modality: str) -> Path:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, generate_uid(), modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        sop_class,
        ds.SOPInstanceUID,
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{name.replace(' ', '_')}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_every_kind_of_storage_sop_class_is_accepted(
    start_scp: StartSCP, data_dir: Path, tmp_path: Path
) -> None:
    scp = start_scp()
    files = [
        minimal_instance(tmp_path, name, uid, modality) for name, (uid, modality) in STORAGE_CLASSES.items()
    ]
    result = dcmtk("storescu", "-R", "-aec", "OPENMSK", "127.0.0.1", str(scp.port), *map(str, files))
    assert result.returncode == 0, result.stderr
    label_map = minimal_instance(tmp_path, "label map", LABEL_MAP_SEG, "SEG")
    ae = AE(ae_title="SEGSENDER")
    ae.add_requested_context(LABEL_MAP_SEG, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="OPENMSK")
    try:
        assert assoc.send_c_store(pydicom.dcmread(label_map)).Status == 0x0000
    finally:
        assoc.release()
    for path in [*files, label_map]:
        assert dataset_bytes(stored_path(data_dir, path)) == dataset_bytes(path)


def raw_file(path: Path, ds: pydicom.Dataset, meta_class: str | None = None, cut: int = 0) -> Path:
    """Write ``ds`` as a file whose meta may claim another SOP class and whose data set may be cut short."""
    ds.file_meta.MediaStorageSOPClassUID = meta_class or ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=False, implicit_vr=False, little_endian=True)
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "stock-pynetdicom"])
def test_malformed_input_is_refused_and_the_association_goes_on(
    start_scp: StartSCP, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_path: bool
) -> None:
    scp = start_scp(fast_path=fast_path)
    study, series = generate_uid(), generate_uid()

    def instance(**changes: object) -> pydicom.Dataset:
        ds = mr_dataset(0, study, series, b"\x00\x01" * 32 * 32, 32, 32)
        ds.preamble = b"\0" * 128
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        return ds

    cases = {
        "truncated": (raw_file(tmp_path / "t.dcm", instance(), cut=700), 0xC000, "truncated"),
        "no series uid": (raw_file(tmp_path / "s.dcm", instance(SeriesInstanceUID=None)), 0xC000, "missing"),
        "no study uid": (raw_file(tmp_path / "u.dcm", instance(StudyInstanceUID=None)), 0xC000, "missing"),
        "wrong sop class": (
            raw_file(tmp_path / "c.dcm", instance(SOPClassUID=CTImageStorage), meta_class=MRImageStorage),
            0xA900,
            "SOPClassUID",
        ),
        "series uid path trick": (
            raw_file(tmp_path / "p.dcm", instance(SeriesInstanceUID="1.2/../../../../escape")),
            0xC000,
            "not a valid UID",
        ),
        "study uid path trick": (
            raw_file(tmp_path / "q.dcm", instance(StudyInstanceUID="..")),
            0xC000,
            "valid",
        ),
        "sop uid path trick": (
            raw_file(tmp_path / "r.dcm", instance(SOPInstanceUID="1.2.3/../../../../x")),
            0xC000,
            "SOPInstanceUID is not a valid UID",
        ),
        "sop uid differs from request": (
            _mismatched_sop(tmp_path / "m.dcm", instance()),
            0xC000,
            "SOPInstanceUID differs",
        ),
    }
    good = raw_file(tmp_path / "good.dcm", instance())
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    ae = AE(ae_title="MALFORMED")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="OPENMSK")
    assert assoc.is_established
    try:
        [served] = scp.ae.active_associations
        assert isinstance(served.dimse.receive_primitive, FastStoreReceiver) is fast_path
        assert isinstance(served.dul._read_pdu_data, functools.partial) is fast_path
        for name, (path, expected, comment) in cases.items():
            status = assoc.send_c_store(path)
            assert status.Status == expected, name
            assert comment in str(status.ErrorComment), (name, status.ErrorComment)
        status = assoc.send_c_store(good)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    stored = [p for p in files_under(data_dir / "incoming") if not p.name.startswith("spare.")]
    assert [p.name for p in stored] == [
        f"{pydicom.dcmread(good).SOPInstanceUID}.dcm"
    ]  # nothing else, no parts
    assert dataset_bytes(stored[0]) == dataset_bytes(good)
    assert [p for p in files_under(tmp_path) if not p.is_relative_to(data_dir) and p.parent != tmp_path] == []
    assert dcmtk("echoscu", "-aec", "OPENMSK", "127.0.0.1", str(scp.port)).returncode == 0  # the SCP goes on


def _mismatched_sop(path: Path, ds: pydicom.Dataset) -> Path:
    raw_file(path, ds)
    data = pydicom.dcmread(path)
    data.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # the request names another instance
    data.save_as(path, enforce_file_format=False)
    return path


def test_allowlist_rejects_unknown_calling_aes_and_wrong_addresses(start_scp: StartSCP) -> None:
    scp = start_scp(scp_allowed_calling_aes="SCANNER1, PACS@127.0.0.0/8, REMOTE@10.99.0.1")

    def echo(calling: str, called: str = "OPENMSK") -> subprocess.CompletedProcess[str]:
        return dcmtk("echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(scp.port))

    assert echo("SCANNER1").returncode == 0
    assert echo("PACS").returncode == 0
    for calling in ("INTRUDER", "REMOTE"):  # unknown AE; known AE from the wrong address
        result = echo(calling)
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
    wrong_called = echo("SCANNER1", called="SOMEONE-ELSE")
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stderr + wrong_called.stdout


def test_association_limit(start_scp: StartSCP) -> None:
    scp = start_scp(scp_max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", scp.port, ae_title="OPENMSK")
    assert held.is_established
    try:
        result = dcmtk("echoscu", "-aec", "OPENMSK", "127.0.0.1", str(scp.port))
        assert result.returncode != 0
        assert "Local Limit Exceeded" in result.stderr + result.stdout
    finally:
        held.release()
    assert dcmtk("echoscu", "-aec", "OPENMSK", "127.0.0.1", str(scp.port)).returncode == 0


def test_disk_guard_rejects_associations_and_answers_out_of_resources(
    start_scp: StartSCP, tmp_path: Path
) -> None:
    full = start_scp(min_free_disk_mb=10**9)  # "a petabyte must stay free": the disk counts as full
    result = dcmtk("echoscu", "-aec", "OPENMSK", "127.0.0.1", str(full.port))
    assert result.returncode != 0
    assert "Rejected Transient" in result.stderr + result.stdout

    scp = start_scp(scp_port=free_port())
    path = write_mr_series(tmp_path / "s", 2, 16, 16)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="OPENMSK")
    try:
        assert assoc.send_c_store(pydicom.dcmread(path[0])).Status == 0x0000
        scp.disk.min_free_bytes = 10**18  # space runs out in the middle of the association
        scp.disk.ttl_s = 0
        status = assoc.send_c_store(pydicom.dcmread(path[1]))
        assert status.Status == 0xA700
        assert "disk" in status.ErrorComment
    finally:
        assoc.release()


def _openssl(*argv: str, cwd: Path) -> None:
    subprocess.run(["openssl", *argv], cwd=cwd, check=True, capture_output=True)


def _certificates(folder: Path) -> Path:
    folder.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=OpenMSK Test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt", cwd=folder)  # fmt: skip
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=stranger",
             "-keyout", "stranger.key", "-out", "stranger.crt", cwd=folder)  # fmt: skip
    return folder


def test_tls_with_client_certificates(start_scp: StartSCP, data_dir: Path, tmp_path: Path) -> None:
    certs = _certificates(tmp_path / "certs")
    scp = start_scp(
        scp_tls_cert=certs / "server.crt",
        scp_tls_key=certs / "server.key",
        scp_tls_ca=certs / "ca.crt",
        scp_tls_require_client_cert=True,
    )
    source = write_mr_series(tmp_path / "s", 2, 16, 16)

    def send(key: str, cert: str) -> subprocess.CompletedProcess[str]:
        return dcmtk("storescu", "+tls", str(certs / key), str(certs / cert), "+cf", str(certs / "ca.crt"),
                     "-aec", "OPENMSK", "127.0.0.1", str(scp.port), *map(str, source))  # fmt: skip

    result = send("client.key", "client.crt")
    assert result.returncode == 0, result.stderr
    assert all(stored_path(data_dir, p).exists() for p in source)
    assert send("stranger.key", "stranger.crt").returncode != 0  # a certificate from no trusted CA
    plain = dcmtk("echoscu", "-aec", "OPENMSK", "127.0.0.1", str(scp.port))
    assert plain.returncode != 0  # TLS only


def test_four_senders_at_once_every_acknowledged_instance_is_on_disk(
    start_scp: StartSCP, data_dir: Path, tmp_path: Path
) -> None:
    scp = start_scp()
    series = [write_mr_series(tmp_path / f"sender{n}", 100, 64, 64, seed=n) for n in range(4)]

    def send(n: int) -> subprocess.CompletedProcess[str]:
        folder = tmp_path / f"sender{n}"
        return dcmtk("storescu", "-v", "-aet", f"SENDER{n}", "-aec", "OPENMSK", "127.0.0.1", str(scp.port),
                     str(folder), "+sd", timeout=120)  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, range(4)))
    for result in results:
        assert result.returncode == 0, result.stderr
        assert (result.stdout + result.stderr).count("Received Store Response (Success)") == 100
    stored = [p for p in files_under(data_dir / "incoming") if p.suffix == ".dcm"]
    assert len(stored) == 400
    for paths in series:
        for path in paths:
            assert dataset_bytes(stored_path(data_dir, path)) == dataset_bytes(path)
