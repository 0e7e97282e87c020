"""The T2 stage of a job: after the segmentation, compute the map, its statistics, the PM and the overlay.

The PM goes with the derived one-echo series it is drawn over (:mod:`worker.dicom.mr`), both into the source
study.

It runs when the loaded series is multi-echo (:class:`~worker.t2.echoes.MultiEchoVolume`) and the job's
routing rule did not turn T2 off. Missing acquisition parameters do not fail the job: T2 is skipped with a
warning (``T2_PARAMETERS_MISSING``, the hint naming the attribute) and the segmentation, thickness, report
and SR are still delivered ("done with warnings").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from openmsk.atomic import atomic_file
from openmsk.jobs import ErrorCode
from worker.dicom.mr import write_derived_mr
from worker.dicom.pm import write_pm
from worker.t2.compute import T2_MODEL_VERSION, compute_t2
from worker.t2.echoes import MultiEchoVolume
from worker.t2.parameters import ParametersMissing
from worker.t2.statistics import merge_t2, region_names, t2_statistics, tissue_names

__all__ = ["T2Outputs", "T2Warning", "run_t2", "write_t2_overlay"]

OVERLAY_NAME = "t2_overlay.png"
OVERLAY_RANGE_MS = (0.0, 80.0)


@dataclass(frozen=True)
class T2Warning:
    """Why T2 was skipped: an error code, a message and a hint naming what is missing."""

    code: ErrorCode
    message: str
    hint: str


@dataclass
class T2Outputs:
    """What the stage wrote: files (overlay, PM, derived series), its DICOM as (path, SOP class, SOP instance),
    a warning."""

    files: list[Path] = field(default_factory=list)
    dicom: list[tuple[Path, str, str]] = field(default_factory=list)
    warning: T2Warning | None = None
    t2_ms: NDArray[np.float32] | None = None


def run_t2(
    volume: MultiEchoVolume,
    labels: NDArray[np.integer],
    measurements: dict[str, Any],
    model_name: str,
    model_version: str,
    out_dir: Path,
    *,
    region_labels: NDArray[np.integer] | None = None,
    overrides: Mapping[str, float] | None = None,
    skip_first_echo: bool = False,
    dicom_outputs: bool = True,
) -> T2Outputs:
    """Compute T2 for *volume*, merge its statistics into *measurements* (in place), write the PM + overlay."""
    out = T2Outputs()
    try:
        t2 = compute_t2(volume, labels, overrides=overrides, skip_first_echo=skip_first_echo)
    except ParametersMissing as exc:
        out.warning = T2Warning(
            ErrorCode.T2_PARAMETERS_MISSING,
            f"T2 not computed: the series header lacks {', '.join(exc.missing)}",
            f"Give {', '.join(exc.missing)} in the routing rule's t2_parameters (scp/routing.toml) or keep "
            "the vendor tags when anonymising; the segmentation and thickness are delivered.",
        )
        return out
    out.t2_ms = t2.t2_ms
    tissues = t2_statistics(t2.t2_ms, labels, tissue_names())
    regions = t2_statistics(t2.t2_ms, region_labels, region_names()) if region_labels is not None else None
    merge_t2(measurements, tissues, regions, {**t2.method, "version": T2_MODEL_VERSION})
    overlay = write_t2_overlay(volume.image, t2.t2_ms, labels, out_dir / OVERLAY_NAME)
    out.files.append(overlay)
    if dicom_outputs:
        t2_model = f"{t2.model}-{T2_MODEL_VERSION}"
        # The map is drawn over the derived one-echo series (see worker.dicom.mr), derived from every echo.
        base = write_derived_mr(volume, model_name, model_version, t2_model, out_dir / "t2_base")
        out.files.extend(base.paths)
        out.dicom.extend(
            (path, base.sop_class_uid, uid) for path, uid in zip(base.paths, base.sop_uids, strict=True)
        )
        pm = write_pm(
            volume,
            t2.t2_ms,
            model_name,
            model_version,
            t2_model,
            out_dir / "t2_pm.dcm",
            further_sources=[ds for echo in volume.echo_sources for ds in echo],
            source_images=base.datasets,
        )
        out.files.append(pm.path)
        out.dicom.append((pm.path, pm.sop_class_uid, pm.sop_uid))
    return out


def _colour(t2: NDArray[np.floating]) -> NDArray[np.uint8]:
    """A blue -> green -> yellow -> red ramp over :data:`OVERLAY_RANGE_MS` (short T2 blue, long T2 red)."""
    low, high = OVERLAY_RANGE_MS
    x = np.clip((t2 - low) / (high - low), 0.0, 1.0)
    r = np.clip(2.0 * x - 0.5, 0, 1)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0, 1)
    b = np.clip(1.0 - 2.0 * x, 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def write_t2_overlay(
    image: NDArray[Any], t2_ms: NDArray[Any], labels: NDArray[Any], out_path: Path, slices: int = 3
) -> Path:
    """A PNG of *slices* slices through the cartilage: grey image, T2 in colour on cartilage and menisci,
    and a colour bar 0-80 ms. Slices are in voxel order (the preview orients anatomically; this shows values).
    """
    from PIL import Image, ImageDraw

    tissue = np.isin(labels, list(tissue_names())) & (t2_ms > 0)
    per_slice = tissue.sum(axis=(0, 1))
    ks = np.nonzero(per_slice)[0]
    if ks.size == 0:
        ks = np.array([image.shape[2] // 2])
    chosen = np.unique(np.quantile(ks, np.linspace(0.25, 0.75, slices)).round().astype(int))
    top = float(np.percentile(image, 99.5)) or 1.0
    tiles = []
    for k in chosen:
        grey = (np.clip(image[:, :, k].T / top, 0, 1) * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, -1)
        where = tissue[:, :, k].T
        rgb[where] = _colour(t2_ms[:, :, k].T[where])
        tiles.append(rgb)
    montage = np.concatenate(tiles, axis=1)
    scale = max(1, 256 // montage.shape[0])
    bar = _colour(np.linspace(*OVERLAY_RANGE_MS, montage.shape[1]))[None].repeat(6, 0)
    picture = Image.fromarray(np.concatenate([montage, bar], 0)).resize(
        (montage.shape[1] * scale, (montage.shape[0] + 6) * scale), Image.NEAREST
    )
    canvas = Image.new("RGB", (picture.width, picture.height + 14), "black")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, picture.height + 1), f"T2 {OVERLAY_RANGE_MS[0]:g} ms", fill="white")
    draw.text((picture.width - 60, picture.height + 1), f"{OVERLAY_RANGE_MS[1]:g} ms", fill="white")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_path) as fh:
        canvas.save(fh, format="PNG")
    return out_path
