"""Orthanc: results over its REST API (orthanc-api-client) with a check that they landed in the source study;
received images forwarded over DICOM to its C-STORE port.

Images go over DICOM, not REST, so that Orthanc records the node's AE title as their sender (RemoteAET): its
auto-routing script (orthanc/autoroute.lua) then knows not to send them back to the node.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import requests
from orthanc_api_client import OrthancApiClient
from orthanc_api_client.exceptions import OrthancApiException

from destinations.base import DeliveryError, HttpDestination
from destinations.cstore import store_files


class OrthancDestination(HttpDestination):
    def __init__(
        self,
        *,
        name: str,
        url: str,
        user: str | None = None,
        password: str | None = None,
        ae_title: str = "ORTHANC",
        dicom_host: str | None = None,
        dicom_port: int = 4242,
        calling_ae_title: str = "OPENMSK",
    ) -> None:
        super().__init__(name=name, url=url, user=user, password=password)
        self.ae_title, self.dicom_port, self.calling_ae_title = ae_title, int(dicom_port), calling_ae_title
        self.dicom_host = dicom_host or urlsplit(self.url).hostname or "127.0.0.1"

    def _connect(self) -> OrthancApiClient:
        return OrthancApiClient(self.url, user=self.user, pwd=self.password)

    def send(self, files: list[Path]) -> None:
        for path in files:
            try:
                self.client.upload(path.read_bytes())
            except (OrthancApiException, requests.RequestException) as exc:
                raise DeliveryError(f"Orthanc at {self.url} refused {path.name}: {exc}") from None

    def _find(self, query: dict[str, str], expand: bool = False) -> list:
        try:
            return self.client.post(
                "tools/find", json={"Level": "Instance", "Query": query, "Expand": expand}
            ).json()
        except (OrthancApiException, requests.RequestException) as exc:
            raise DeliveryError(f"Orthanc at {self.url} did not answer: {exc}") from None

    def confirm(self, study_uid: str, sop_uids: list[str]) -> None:
        for sop_uid in sop_uids:
            if not self._find({"StudyInstanceUID": study_uid, "SOPInstanceUID": sop_uid}):
                raise DeliveryError(f"instance {sop_uid} is not in study {study_uid} on Orthanc")

    def forward(self, files: list[Path], on_sent: Callable[[int], None] | None = None) -> None:
        store_files(
            files,
            ae_title=self.ae_title,
            host=self.dicom_host,
            port=self.dicom_port,
            calling_ae_title=self.calling_ae_title,
            on_sent=on_sent,
        )

    def is_origin(self, calling_ae: str) -> bool:
        return calling_ae.strip() == self.ae_title

    def present(self, study_uid: str, series_uid: str) -> set[str]:
        found = self._find({"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}, expand=True)
        return {str(item.get("MainDicomTags", {}).get("SOPInstanceUID", "")) for item in found} - {""}
