"""The DICOM objects the worker writes, one subpackage per kind, each of the same inner shape.

``sop.py`` builds and writes the object (its UIDs derived from the source series and model, so a rerun
replaces it); ``content.py`` says what it holds (codes, descriptions, series numbers). ``general.py`` is what
all of them share (equipment identity, the source series, the atomic write).

- ``seg/`` - the knee Segmentations: tissues, and cartilage subregions (``regions=True``).
- ``sr/`` - the TID 1500 measurement report (tissues, subregions, change since the prior visit).
- ``sc/`` - Secondary Capture images of the cartilage thickness maps.
"""
