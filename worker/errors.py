"""Failures a job can end with: an error code, a message for the user, a hint, and whether a retry can help."""

from __future__ import annotations

from openmsk.jobs import ErrorCode


class JobFailure(Exception):
    """A stage failed. ``permanent`` failures (bad input, unknown model) fail the job at once; others are retried."""

    def __init__(self, code: ErrorCode, message: str, hint: str = "", *, permanent: bool = True) -> None:
        super().__init__(message)
        self.code, self.message, self.hint, self.permanent = code, message, hint, permanent


class SeriesError(JobFailure):
    """The input series cannot be turned into a volume (missing/uneven slices, mixed orientation, localizer...)."""

    def __init__(self, message: str, hint: str = "Send the complete 3D series again.") -> None:
        super().__init__(ErrorCode.DICOM_ERROR, message, hint, permanent=True)


class GeometryError(JobFailure):
    def __init__(self, message: str, hint: str = "The node segments 3D series with one orientation.") -> None:
        super().__init__(ErrorCode.UNSUPPORTED_GEOMETRY, message, hint, permanent=True)
