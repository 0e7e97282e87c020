"""Orthanc over its REST API (orthanc-api-client), with a check that the results landed in the source study."""

from __future__ import annotations

from pathlib import Path

import requests
from orthanc_api_client import OrthancApiClient
from orthanc_api_client.exceptions import OrthancApiException

from destinations.base import DeliveryError, HttpDestination


class OrthancDestination(HttpDestination):
    def _connect(self) -> OrthancApiClient:
        return OrthancApiClient(self.url, user=self.user, pwd=self.password)

    def send(self, files: list[Path]) -> None:
        for path in files:
            try:
                self.client.upload(path.read_bytes())
            except (OrthancApiException, requests.RequestException) as exc:
                raise DeliveryError(f"Orthanc at {self.url} refused {path.name}: {exc}") from None

    def confirm(self, study_uid: str, sop_uids: list[str]) -> None:
        try:
            for sop_uid in sop_uids:
                found = self.client.post(
                    "tools/find",
                    json={
                        "Level": "Instance",
                        "Query": {"StudyInstanceUID": study_uid, "SOPInstanceUID": sop_uid},
                    },
                ).json()
                if not found:
                    raise DeliveryError(f"instance {sop_uid} is not in study {study_uid} on Orthanc")
        except (OrthancApiException, requests.RequestException) as exc:
            raise DeliveryError(f"Orthanc at {self.url} did not answer: {exc}") from None
