"""The model registry: which models exist and where their verified weights are (read by the web and the
worker alike). The segmenters that load and run them are the worker's (:mod:`worker.models`).

Importing this package is cheap: it never imports torch or nnU-Net.
"""

from openmsk.models.registry import ModelEntry, Registry, RegistryError, load_registry, model_statuses

__all__ = ["ModelEntry", "Registry", "RegistryError", "load_registry", "model_statuses"]
