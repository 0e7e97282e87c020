"""Segmentation models: the registry (which models exist and where their verified weights are), the segmenter
(one loaded model per worker process) and the demo models trained on phantoms.

Importing this package is cheap; torch and nnU-Net are imported when a model is loaded or trained.
"""

from openmsk.models.registry import ModelEntry, Registry, RegistryError, load_registry, model_statuses

__all__ = ["ModelEntry", "Registry", "RegistryError", "load_registry", "model_statuses"]
