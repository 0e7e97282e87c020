"""A DICOMweb server over STOW-RS (dicomweb-client)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from worker.destinations.base import DeliveryError, Destination


class DicomWebDestination(Destination):
    def __init__(
        self,
        *,
        name: str,
        url: str,
        user: str | None = None,
        password: str | None = None,
        labelmap: bool = False,
    ) -> None:
        self.name, self.url, self.labelmap = name, url.rstrip("/"), labelmap
        session = requests.Session()
        if user:
            session.auth = (user, password or "")
        self.client = DICOMwebClient(url=self.url, session=session)

    def send(self, files: list[Path]) -> None:
        try:
            self.client.store_instances([pydicom.dcmread(path) for path in files])
        except (requests.RequestException, RuntimeError, ValueError) as exc:
            raise DeliveryError(f"STOW-RS to {self.url} failed: {exc}") from None
