"""Uploads: stream the request body to disk, find out what it is, keep one series or volume, queue a job.

Three steps, one module each:

- :mod:`web.upload.receive` — the multipart body streamed into files of our own naming under the size limits
  (413 as soon as they are passed), zips unpacked safely (zip-slip, links, zip bombs);
- :mod:`web.upload.inspect` — what the files are (DICOM series, NIfTI, NRRD; by content, never by name), which
  series to keep, and the input arranged under ``DATA_DIR/uploads/<job id>/``;
- :mod:`web.upload.submit` — the model, the job record, the archive order for the images when Orthanc is
  configured (``openmsk.forwarding``), the queue.

Every refusal is a :class:`~web.errors.RequestError` with a 4xx status and removes the upload folder, so a
refused upload leaves nothing behind. The body is never held in memory.
"""

from __future__ import annotations

from web.upload.inspect import StoredInput, dicom_instance, store_input, volume_kind
from web.upload.receive import FILE_FIELD, Received, body_limit, receive, upload_limit
from web.upload.submit import forward_order, new_upload_folder, offered_models, resolve_model, submit

__all__ = [
    "FILE_FIELD",
    "Received",
    "StoredInput",
    "body_limit",
    "dicom_instance",
    "forward_order",
    "new_upload_folder",
    "offered_models",
    "receive",
    "resolve_model",
    "store_input",
    "submit",
    "upload_limit",
    "volume_kind",
]
