"""Any DICOM AE over C-STORE (pynetdicom SCU), proposing exactly the SOP classes of the results."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pynetdicom import AE

from destinations.base import DeliveryError, Destination


class DicomDestination(Destination):
    def __init__(
        self,
        *,
        name: str,
        ae_title: str,
        host: str,
        port: int,
        calling_ae_title: str = "OPENMSK",
        labelmap: bool = False,
    ) -> None:
        self.name, self.ae_title, self.host, self.port = name, ae_title, host, int(port)
        self.calling_ae_title, self.labelmap = calling_ae_title, labelmap

    def send(self, files: list[Path]) -> None:
        datasets = [pydicom.dcmread(path) for path in files]
        ae = AE(ae_title=self.calling_ae_title)
        # Propose each SEG/SR SOP class explicitly with the transfer syntax it was written in.
        for sop_class, syntax in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            raise DeliveryError(f"{self.ae_title}@{self.host}:{self.port} refused the association")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = status.get("Status") if status else None
                if code is None or code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise DeliveryError(
                        f"{self.ae_title} answered C-STORE of {ds.SOPInstanceUID} with status "
                        f"{'none' if code is None else hex(code)}"
                    )
        finally:
            assoc.release()
