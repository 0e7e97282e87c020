"""Which device inference runs on, and how the worker describes it in its heartbeat."""

from __future__ import annotations

from typing import Any


def resolve_device(setting: str) -> str:
    """``auto`` → ``cuda`` when a CUDA device is usable, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("OPENMSK_DEVICE=cuda but no CUDA device is available to torch")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def device_info(device: str) -> dict[str, Any]:
    """The heartbeat's view of the device: name and free memory of the GPU, or none on CPU."""
    import torch

    info: dict[str, Any] = {"device": device, "gpu": None, "gpu_free_bytes": None, "torch": torch.__version__}
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        info.update(gpu=torch.cuda.get_device_name(), gpu_free_bytes=int(free))
    return info
