"""OpenMSK Node: a DICOM node that segments knee MRI with nnU-Net and returns results to the PACS.

This package holds what every room of the node shares — settings, the job record, the queue, worker heartbeats,
health — and the command line. The rooms themselves are the sibling packages ``scp``, ``worker`` and ``web``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("openmsk")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
