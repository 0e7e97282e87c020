"""The worker's models: the segmenters (one loaded model per worker process), the slice-wise 2D network and the
demo models trained on phantoms, and the ``openmsk models`` command.

Which models exist and where their verified weights are is the registry's business
(:mod:`openmsk.models.registry`, read by the web as well); everything here runs torch or nnU-Net and belongs to
the worker. Importing this package is cheap: torch and nnU-Net are imported when a model is loaded or trained.
"""
