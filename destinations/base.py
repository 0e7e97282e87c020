"""The interface every destination type implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


class DeliveryError(Exception):
    """Sending failed; the job's delivery is retried with backoff until the retry budget is spent."""


class Destination(ABC):
    """Sends result instances somewhere and, where it can, confirms they arrived."""

    name: str
    #: SEG as a Label Map SEG (DICOM 2023+) instead of BINARY for this destination.
    labelmap: bool = False

    @abstractmethod
    def send(self, files: list[Path]) -> None:
        """Store every file; raise :class:`DeliveryError` if any was not accepted."""

    def confirm(self, study_uid: str, sop_uids: list[str]) -> None:  # noqa: B027 - optional for a type
        """Check the instances are in ``study_uid`` at the destination (only where it can be asked)."""


class HttpDestination(Destination):
    """A destination reached over HTTP(S) at *url*, with optional basic authentication."""

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
        self.user, self.password = user, password
        self.client = self._connect()

    @abstractmethod
    def _connect(self) -> Any:
        """The client library's object for ``self.url`` with these credentials (no request is made yet)."""
