"""Any DICOM AE over C-STORE (pynetdicom SCU): results, and received images forwarded as they came."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from destinations.base import Destination
from destinations.cstore import store_files


class DicomDestination(Destination):
    def __init__(
        self, *, name: str, ae_title: str, host: str, port: int, calling_ae_title: str = "OPENMSK"
    ) -> None:
        self.name, self.ae_title, self.host, self.port = name, ae_title, host, int(port)
        self.calling_ae_title = calling_ae_title

    def send(self, files: list[Path]) -> None:
        self.forward(files)

    def forward(self, files: list[Path], on_sent: Callable[[int], None] | None = None) -> None:
        store_files(
            files,
            ae_title=self.ae_title,
            host=self.host,
            port=self.port,
            calling_ae_title=self.calling_ae_title,
            on_sent=on_sent,
        )

    def is_origin(self, calling_ae: str) -> bool:
        return calling_ae.strip() == self.ae_title
