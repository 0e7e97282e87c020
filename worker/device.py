"""Which device inference runs on, and how the worker describes it in its heartbeat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(RuntimeError):
    """The requested device is not one of :data:`DEVICES`, or is ``cuda`` where torch sees no CUDA device."""


def resolve_device(setting: str) -> str:
    """``auto`` → ``cuda`` when a CUDA device is usable, else ``cpu``; ``cuda`` without one is an error.

    The one place the worker, ``openmsk segment``, the segmenters and the benchmarks choose their device.
    """
    if setting not in DEVICES:
        raise DeviceError(f"device must be auto, cpu or cuda, got {setting!r}")
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' requested (OPENMSK_DEVICE) but no CUDA device is available to torch")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def device_info(device: str) -> dict[str, Any]:
    """The heartbeat's view of the device: name and free memory of the GPU, or none on CPU."""
    import torch

    info: dict[str, Any] = {"device": device, "gpu": None, "gpu_free_bytes": None, "torch": torch.__version__}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), gpu_free_bytes=gpu_free_bytes())
    return info


def gpu_free_bytes() -> int | None:
    """Free memory of the current CUDA device now (bytes), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def gpu_free_probe(device: str) -> Callable[[], int | None] | None:
    """What the heartbeat calls on every beat to report free GPU memory (None on CPU: nothing to measure)."""
    return gpu_free_bytes if device == "cuda" else None
