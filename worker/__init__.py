"""The worker: Dramatiq actors that segment series, write DICOM-SEG/SR and reports, and deliver them.

Heavy imports (torch, nnunetv2) happen only here, never in the SCP or the web.
"""
