"""A DICOMweb server over STOW-RS (dicomweb-client)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from destinations.base import DeliveryError, HttpDestination


class DicomWebDestination(HttpDestination):
    def _connect(self) -> DICOMwebClient:
        session = requests.Session()
        if self.user:
            session.auth = (self.user, self.password or "")
        return DICOMwebClient(url=self.url, session=session)

    def send(self, files: list[Path]) -> None:
        try:
            self.client.store_instances([pydicom.dcmread(path) for path in files])
        except (requests.RequestException, RuntimeError, ValueError) as exc:
            raise DeliveryError(f"STOW-RS to {self.url} failed: {exc}") from None
