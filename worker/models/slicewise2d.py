"""A DOSMA-style 2D U-Net applied slice by slice in the sagittal plane, in plain PyTorch.

DOSMA's knee models are 2D networks that segment each sagittal slice into femur/tibia/patella, femoral,
tibial and patellar cartilage and meniscus; medial and lateral are not told apart by the network (a single
sagittal slice cannot know which side of the knee it is on) but by an analysis step over the whole volume.
This module does the same:

1. the canonical volume (see :mod:`worker.models.segmenter`) is z-scored and resampled to an isotropic grid
   (``target_spacing`` mm) so every acquisition plane gives the network the same pixel size;
2. every sagittal slice (constant x) goes through the 2D U-Net; softmax probabilities are resampled back to
   the input grid and arg-maxed;
3. the registry entry maps the network's labels (:data:`~openmsk.models.registry.COMPARTMENT_FREE_LABELS`)
   to canonical ones and names the ``split_medial_lateral`` step
   (:func:`worker.models.segmenter.split_medial_lateral`), which assigns tibial cartilage and menisci to
   the medial or lateral compartment by anatomy.

The checkpoint is a plain dict (``config`` of numbers/strings, ``state_dict`` of tensors) loaded with
``torch.load(weights_only=True)``: no pickled code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from openmsk.models.registry import COMPARTMENT_FREE_LABELS

# The network's classes: background and what one sagittal slice can tell apart (COMPARTMENT_FREE_LABELS).
N_CLASSES = 1 + len(COMPARTMENT_FREE_LABELS)


@dataclass(frozen=True)
class SlicewiseConfig:
    """Everything needed to rebuild the network and its pre-processing; stored in the checkpoint."""

    features: tuple[int, ...] = (8, 16, 32, 64)
    target_spacing: float = 1.6
    n_classes: int = N_CLASSES
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["features"] = list(self.features)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlicewiseConfig:
        return cls(
            features=tuple(int(f) for f in data["features"]),
            target_spacing=float(data["target_spacing"]),
            n_classes=int(data["n_classes"]),
            extra=dict(data.get("extra", {})),
        )


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.InstanceNorm2d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.InstanceNorm2d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet2D(nn.Module):
    """A plain 2D U-Net: two 3×3 convolutions per level, max-pool down, transposed convolution up, skips."""

    def __init__(self, features: tuple[int, ...], n_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_channels
        for f in features:
            self.down.append(_Block(cin, f))
            cin = f
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for f in reversed(features[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, f, 2, stride=2))
            self.dec.append(_Block(2 * f, f))
            cin = f
        self.head = nn.Conv2d(cin, n_classes, 1)

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** (len(self.down) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, dec in zip(self.up, self.dec, strict=True):
            x = up(x)
            x = dec(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


# --------------------------------------------------------------------------------------------- pre/post


def normalise(image: NDArray[Any]) -> NDArray[np.float32]:
    """Z-score over the whole volume (MR intensities have no absolute scale)."""
    image = np.asarray(image, dtype=np.float32)
    std = float(image.std())
    return (image - float(image.mean())) / (std if std > 0 else 1.0)


def resampled_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: float
) -> tuple[int, int, int]:
    """Grid size after resampling *shape* at *spacing* to isotropic *target* mm."""
    out = tuple(max(1, round(n * s / target)) for n, s in zip(shape, spacing, strict=True))
    return (out[0], out[1], out[2])


def resample(volume: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resampling of a (C, X, Y, Z) tensor to *shape* (voxel centres aligned, like nnU-Net)."""
    if tuple(volume.shape[1:]) == tuple(shape):
        return volume
    return F.interpolate(volume[None], size=shape, mode="trilinear", align_corners=False)[0]


# --------------------------------------------------------------------------------------------- model


class SlicewiseModel:
    """A loaded 2D U-Net and its pre/post-processing: ``predict_volume`` is what the segmenter calls."""

    def __init__(self, network: UNet2D, config: SlicewiseConfig, device: str, batch_slices: int = 32) -> None:
        self.network = network.to(device).eval()
        self.config = config
        self.device = device
        self.batch_slices = batch_slices

    @torch.inference_mode()
    def predict_probabilities(
        self, volume: torch.Tensor, progress: Callable[[float], None] | None = None
    ) -> torch.Tensor:
        """Softmax (C, X, Y, Z) of a normalised, resampled (1, X, Y, Z) volume, sagittal slice by slice."""
        _, nx, ny, nz = volume.shape
        d = self.network.divisor
        py, pz = (-ny) % d, (-nz) % d
        slices = volume.permute(1, 0, 2, 3)  # (X, 1, Y, Z): one 2D image per sagittal slice
        slices = F.pad(slices, (0, pz, 0, py))
        out = torch.empty((self.config.n_classes, nx, ny, nz), dtype=torch.float32)
        for start in range(0, nx, self.batch_slices):
            batch = slices[start : start + self.batch_slices].to(self.device)
            probs = torch.softmax(self.network(batch), dim=1)[:, :, :ny, :nz]
            out[:, start : start + batch.shape[0]] = probs.permute(1, 0, 2, 3).float().cpu()
            if progress is not None:
                progress(min(1.0, (start + batch.shape[0]) / nx))
        return out

    def predict_volume(
        self,
        image: NDArray[Any],
        spacing: tuple[float, float, float],
        progress: Callable[[float], None] | None = None,
    ) -> NDArray[np.uint8]:
        """Network labels (COMPARTMENT_FREE_LABELS) for a canonical (x, y, z) volume with *spacing* mm."""
        shape = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))
        work_shape = resampled_shape(shape, spacing, self.config.target_spacing)
        volume = resample(torch.from_numpy(normalise(image))[None], work_shape)
        report = progress or (lambda _f: None)
        probs = self.predict_probabilities(volume, lambda f: report(0.9 * f))
        probs = resample(probs, shape)
        return probs.argmax(0).numpy().astype(np.uint8)


def save_slicewise_model(path: Path, network: UNet2D, config: SlicewiseConfig, half: bool = True) -> None:
    """Write a slim, weights-only checkpoint (float16 tensors by default: half the size, same predictions)."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v).clone()
        for k, v in network.state_dict().items()
    }
    torch.save({"format": "openmsk-slicewise2d/1", "config": config.to_dict(), "state_dict": state}, path)


def load_slicewise_model(path: Path, device: str) -> SlicewiseModel:
    """Load a checkpoint written by :func:`save_slicewise_model` (``weights_only``: no code is unpickled)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != "openmsk-slicewise2d/1":
        raise ValueError(f"{path} is not an OpenMSK slicewise 2D checkpoint")
    config = SlicewiseConfig.from_dict(checkpoint["config"])
    network = UNet2D(config.features, config.n_classes)
    network.load_state_dict({k: v.float() for k, v in checkpoint["state_dict"].items()})
    return SlicewiseModel(network, config, device)
