"""Destinations other than the node's own Orthanc, against a real peer: C-STORE to any AE and DICOMweb
STOW-RS (both served by a real Orthanc), their failures as :class:`DeliveryError`, and the TOML that
configures them."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import requests

from destinations import DeliveryError, load_destinations
from destinations.dicom import DicomDestination
from destinations.dicomweb import DicomWebDestination
from openmsk.config import Settings
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.managed.process import free_port
from openmsk.phantom import generate, write_series
from worker.analysis import analyse
from worker.dicom.seg import write_seg
from worker.dicom.sr import write_sr
from worker.volume import load_series, read_series


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A SEG and an SR of a small phantom, as the worker writes them."""
    out = tmp_path_factory.mktemp("results")
    phantom = generate(seed=31, size="small")
    volume = load_series(read_series(write_series(phantom, out / "series")["dicom_dir"]))
    seg = write_seg(volume, phantom.labels, "test_model", "1.0", out / "seg.dcm")
    sr = write_sr(
        seg.path, volume, analyse(phantom.labels, volume.spacing), "test_model", "1.0", out / "sr.dcm"
    )
    return [seg.path, sr.path]


def _stored_sop_classes(orthanc: ManagedOrthanc, files: list[Path]) -> list[str]:
    """The SOP class UIDs Orthanc holds for the SOP instances of *files* (looked up one by one)."""
    auth = (orthanc.user, orthanc.password)
    found = []
    for path in files:
        sop_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        hits = requests.post(f"{orthanc.url}/tools/lookup", data=sop_uid, auth=auth, timeout=10).json()
        for hit in hits:
            tags = requests.get(f"{orthanc.url}/instances/{hit['ID']}/simplified-tags", auth=auth, timeout=10)
            found.append(tags.json()["SOPClassUID"])
    return found


def _delete_all(orthanc: ManagedOrthanc) -> None:
    auth = (orthanc.user, orthanc.password)
    for study in requests.get(f"{orthanc.url}/studies", auth=auth, timeout=10).json():
        requests.delete(f"{orthanc.url}/studies/{study}", auth=auth, timeout=10)


def _sop_classes(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in files]


def test_c_store_destination_stores_seg_and_sr(orthanc_server: ManagedOrthanc, results: list[Path]) -> None:
    _delete_all(orthanc_server)
    pacs = DicomDestination(
        name="pacs", ae_title=orthanc_server.aet, host="127.0.0.1", port=orthanc_server.dicom_port
    )
    pacs.send(results)
    pacs.send(results)  # a rerun: the same SOP instance UIDs replace, never add
    assert sorted(_stored_sop_classes(orthanc_server, results)) == sorted(_sop_classes(results))


def test_stow_rs_destination_stores_seg_and_sr(orthanc_server: ManagedOrthanc, results: list[Path]) -> None:
    _delete_all(orthanc_server)
    archive = DicomWebDestination(
        name="archive",
        url=f"{orthanc_server.url}/dicom-web/",
        user=orthanc_server.user,
        password=orthanc_server.password,
    )
    archive.send(results)
    archive.send(results)
    assert sorted(_stored_sop_classes(orthanc_server, results)) == sorted(_sop_classes(results))


def test_unreachable_ae_is_a_delivery_error(results: list[Path]) -> None:
    pacs = DicomDestination(name="pacs", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    with pytest.raises(DeliveryError, match=r"NOBODY@127\.0\.0\.1:\d+ refused the association"):
        pacs.send(results)


def test_stow_rs_refused_credentials_are_a_delivery_error(
    orthanc_server: ManagedOrthanc, results: list[Path]
) -> None:
    archive = DicomWebDestination(
        name="archive", url=f"{orthanc_server.url}/dicom-web", user=orthanc_server.user, password="wrong"
    )
    with pytest.raises(DeliveryError, match=r"STOW-RS to .* failed: .*401"):
        archive.send(results)


def _with_destinations(settings: Settings, tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "destinations.toml"
    path.write_text(text)
    return settings.model_copy(update={"destinations": path})


def test_destinations_file_builds_each_type(settings: Settings, tmp_path: Path) -> None:
    configured = _with_destinations(
        settings,
        tmp_path,
        """
        [destinations.pacs]
        type = "dicom"
        ae_title = "PACS"
        host = "10.0.0.5"
        port = 104

        [destinations.archive]
        type = "dicomweb"
        url = "https://pacs.example.org/dicom-web/"
        """,
    )
    found = load_destinations(configured)
    assert isinstance(found["pacs"], DicomDestination)
    assert (found["pacs"].ae_title, found["pacs"].host, found["pacs"].port) == ("PACS", "10.0.0.5", 104)
    assert isinstance(found["archive"], DicomWebDestination)
    assert found["archive"].url == "https://pacs.example.org/dicom-web"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            'type = "ftp"',
            r"destination 'bad': type must be one of \['dicom', 'dicomweb', 'orthanc'\], got 'ftp'",
        ),
        (
            'type = "dicom"\nae_title = "X"\nhost = "h"\nport = 104\ncolour = "red"',
            r"destination 'bad': .*colour",
        ),
        ('type = "dicomweb"', r"destination 'bad': .*url"),
    ],
)
def test_destinations_file_errors_name_the_entry(
    settings: Settings, tmp_path: Path, entry: str, message: str
) -> None:
    configured = _with_destinations(settings, tmp_path, f"[destinations.bad]\n{entry}\n")
    with pytest.raises(ValueError, match=message):
        load_destinations(configured)
