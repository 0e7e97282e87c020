"""Where results go: a registry of destination types, and the destinations a site configured.

A destination is configured by name in a TOML file (``OPENMSK_DESTINATIONS``); routing rules name destinations.
``orthanc`` is always defined when an Orthanc is configured (``OPENMSK_ORTHANC_URL``)::

    [destinations.pacs]            # any DICOM AE, over C-STORE
    type = "dicom"
    ae_title = "PACS"
    host = "10.0.0.5"
    port = 104

    [destinations.archive]         # DICOMweb STOW-RS
    type = "dicomweb"
    url = "https://pacs.example.org/dicom-web"
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from typing import Any

from destinations.base import DeliveryError, Destination
from destinations.dicom import DicomDestination
from destinations.dicomweb import DicomWebDestination
from destinations.orthanc import OrthancDestination
from openmsk.config import Settings

DESTINATION_TYPES: dict[str, Callable[..., Destination]] = {
    "orthanc": OrthancDestination,
    "dicom": DicomDestination,
    "dicomweb": DicomWebDestination,
}


def load_destinations(settings: Settings) -> dict[str, Destination]:
    """Every configured destination by name; a bad entry is a ``ValueError`` naming it."""
    found: dict[str, Destination] = {}
    if settings.orthanc_url:
        found["orthanc"] = OrthancDestination(
            name="orthanc",
            url=settings.orthanc_url,
            user=settings.orthanc_user,
            password=settings.orthanc_password,
        )
    if settings.destinations is not None:
        config: dict[str, Any] = tomllib.loads(settings.destinations.read_text()).get("destinations", {})
        for name, raw in config.items():
            options = dict(raw)
            kind = options.pop("type", None)
            if kind not in DESTINATION_TYPES:
                raise ValueError(
                    f"destination {name!r}: type must be one of {sorted(DESTINATION_TYPES)}, got {kind!r}"
                )
            try:
                found[name] = DESTINATION_TYPES[kind](name=name, **options)
            except TypeError as exc:
                raise ValueError(f"destination {name!r}: {exc}") from None
    return found


__all__ = ["DESTINATION_TYPES", "DeliveryError", "Destination", "load_destinations"]
