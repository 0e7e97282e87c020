"""When is a series complete? As soon as its sender says so by releasing the association, plus a short quiet.

DICOM has no "end of series" message, so other nodes wait for a long silence (Orthanc's StableAge and mercure
both default to 60 s). A sender that releases its association has finished sending, though, so this tracker
calls a series complete when

* every association that delivered instances of it has been **released** and no instance of it arrived for
  ``quiet_s`` (``OPENMSK_SERIES_QUIET_S``, 2 s: room for a sender that sends one series over several
  associations in a row), or
* no instance of it arrived for ``timeout_s`` (``OPENMSK_SERIES_TIMEOUT_S``, 30 s) whatever the
  associations do (a sender that keeps its association open, or one whose association was aborted — an
  aborted transfer is not a finished one, so it falls back to the timeout unless a later association of the
  series is released).

A completed series leaves the tracker. Instances of it that arrive later start a new round, which ends in a
new job that supersedes the first (see :mod:`scp.dispatch`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from scp.storage import InstanceHeader


@dataclass
class PendingSeries:
    """A series being received: who sends it, what its first instance says, and when it was last heard of."""

    study_uid: str
    series_uid: str
    header: InstanceHeader
    calling_ae: str
    called_ae: str
    first_arrival: float
    last_arrival: float
    received: int = 0
    open_associations: set[Hashable] = field(default_factory=set)
    aborted: bool = False  # an association that delivered to it ended without a release
    restored: bool = False  # found on disk at start-up, not received in this run

    def complete_at(self, quiet_s: float, timeout_s: float) -> float:
        """The clock time at which the series counts as complete if nothing else happens."""
        if self.open_associations or self.aborted:
            return self.last_arrival + timeout_s
        return self.last_arrival + min(quiet_s, timeout_s)


class CompletionTracker:
    """Thread-safe bookkeeping of pending series, fed by the SCP's event handlers."""

    def __init__(self, quiet_s: float, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet_s = quiet_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._series: dict[tuple[str, str], PendingSeries] = {}
        self._by_association: dict[Hashable, set[tuple[str, str]]] = {}
        self._changed = threading.Condition()

    def instance_stored(
        self, association: Hashable, header: InstanceHeader, calling_ae: str, called_ae: str
    ) -> None:
        """An instance of ``header``'s series was stored over ``association`` (an id unique in the SCP: an
        int in one process, ``(pid, n)`` from receiver processes)."""
        key = (header.study_uid, header.series_uid)
        now = self.clock()
        with self._changed:
            series = self._series.get(key)
            if series is None:
                series = PendingSeries(
                    study_uid=header.study_uid,
                    series_uid=header.series_uid,
                    header=header,
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    first_arrival=now,
                    last_arrival=now,
                )
                self._series[key] = series
            series.last_arrival = now
            series.received += 1
            series.open_associations.add(association)
            self._by_association.setdefault(association, set()).add(key)

    def association_ended(self, association: Hashable, released: bool) -> None:
        """``association`` is over: released normally (``released``) or aborted / dropped. Idempotent."""
        with self._changed:
            for key in self._by_association.pop(association, set()):
                series = self._series.get(key)
                if series is None:
                    continue
                series.open_associations.discard(association)
                series.aborted = not released
            self._changed.notify_all()

    def restore(self, header: InstanceHeader, calling_ae: str, called_ae: str, instances: int) -> None:
        """Put a series found on disk (and never dispatched) back in; it completes after the quiet time."""
        key = (header.study_uid, header.series_uid)
        now = self.clock()
        with self._changed:
            if key in self._series:
                return
            self._series[key] = PendingSeries(
                study_uid=header.study_uid,
                series_uid=header.series_uid,
                header=header,
                calling_ae=calling_ae,
                called_ae=called_ae,
                first_arrival=now,
                last_arrival=now,
                received=instances,
                restored=True,
            )
            self._changed.notify_all()

    def pop_complete(self) -> list[PendingSeries]:
        """Remove and return every series that is complete now, oldest first."""
        now = self.clock()
        with self._changed:
            done = [s for s in self._series.values() if s.complete_at(self.quiet_s, self.timeout_s) <= now]
            for series in done:
                del self._series[(series.study_uid, series.series_uid)]
            return sorted(done, key=lambda s: s.first_arrival)

    def wait(self, timeout: float) -> None:
        """Sleep until the next series may be complete, something changed, or ``timeout`` passed."""
        with self._changed:
            now = self.clock()
            deadlines = [s.complete_at(self.quiet_s, self.timeout_s) for s in self._series.values()]
            delay = min([timeout, *(d - now for d in deadlines)])
            if delay > 0:
                self._changed.wait(delay)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def pending(self) -> list[PendingSeries]:
        with self._changed:
            return list(self._series.values())
