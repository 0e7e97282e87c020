"""The interface every destination type implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DeliveryError(Exception):
    """Sending failed; the job's delivery is retried with backoff until the retry budget is spent."""


class Destination(ABC):
    """Sends result instances somewhere and, where it can, confirms they arrived."""

    name: str

    @abstractmethod
    def send(self, files: list[Path]) -> None:
        """Store every file; raise :class:`DeliveryError` if any was not accepted."""

    def confirm(self, study_uid: str, sop_uids: list[str]) -> None:  # noqa: B027 - optional for a type
        """Check the instances are in ``study_uid`` at the destination (only where it can be asked)."""

    # Archive forwarding of received images (forwarder/): a type that cannot archive says so when asked to.

    def forward(self, files: list[Path], on_sent: Callable[[int], None] | None = None) -> None:
        """Store received instances exactly as they were received (no transcoding); ``on_sent(n)`` per file."""
        raise DeliveryError(f"destination {self.name!r} cannot archive received images")

    def is_origin(self, calling_ae: str) -> bool:
        """True when a series sent by ``calling_ae`` came from this destination (it is not sent back)."""
        return False

    def present(self, study_uid: str, series_uid: str) -> set[str] | None:
        """The SOP Instance UIDs of the series already at the destination; None where it cannot be asked."""
        return None


class HttpDestination(Destination):
    """A destination reached over HTTP(S) at *url*, with optional basic authentication."""

    def __init__(
        self,
        *,
        name: str,
        url: str,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.name, self.url = name, url.rstrip("/")
        self.user, self.password = user, password
        self.client = self._connect()

    @abstractmethod
    def _connect(self) -> Any:
        """The client library's object for ``self.url`` with these credentials (no request is made yet)."""
