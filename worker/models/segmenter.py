"""Loading a registered model once per worker process and segmenting knee volumes with it.

Every model sees volumes in one **canonical orientation**: array axes aligned with patient LPS to the nearest
axis, index increasing toward +L, +P, +S (the orientation of an ITK/DICOM image with identity direction).
:func:`to_canonical` takes any acquisition (sagittal, coronal, axial, oblique; either knee) there by permuting
and flipping axes — no resampling, so labels map back voxel for voxel with :func:`from_canonical`. The demo
models are trained on canonical volumes of all acquisition planes, and the worker does
``to_canonical -> Segmenter.segment -> from_canonical``.

nnU-Net models run through nnU-Net's own ``nnUNetPredictor.predict_single_npy_array`` (its preprocessing,
sliding window, mirroring and resampling back). nnU-Net's numpy path wants arrays ordered like SimpleITK reads
them, ``(c, z, y, x)`` with spacing ``(sz, sy, sx)``; the demo models were trained from NIfTI files read by
SimpleITK, so :meth:`Segmenter.segment` transposes ``(x, y, z)`` to ``(z, y, x)`` and reverses the spacing —
the same arrays ``nnUNetv2_predict`` builds from a NIfTI of the canonical volume.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from numpy.typing import NDArray

from openmsk.labels import BONES, BY_NAME, CARTILAGES
from openmsk.models.registry import POSTPROCESS_STEPS, ModelEntry, RegistryError
from worker.device import DeviceError, resolve_device
from worker.models.refine import refine_cartilage

Progress = Callable[[float], None]


class SegmenterError(Exception):
    """A model could not be loaded or run (bad device, broken checkpoint, shape mismatch)."""


# --------------------------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class CanonicalVolume:
    """A volume reoriented to canonical (LPS-aligned) axes and how to undo it.

    ``axes[c]`` is the source axis that became canonical axis ``c``; ``flips[c]``: whether it was reversed.
    """

    image: NDArray[Any]
    affine: NDArray[np.float64]  # canonical voxel index -> patient LPS mm
    spacing: tuple[float, float, float]
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    source_shape: tuple[int, int, int]


def canonical_transform(
    affine_lps: NDArray[np.float64],
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For each canonical axis (L, P, S): the nearest source voxel axis and whether it points the other way.

    Uses a greedy assignment on the direction cosines (largest component first), so an oblique volume goes to
    the nearest axis-aligned orientation and every source axis is used exactly once.
    """
    rot = np.asarray(affine_lps, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    if np.any(norms <= 0) or abs(np.linalg.det(rot)) < 1e-9:
        raise SegmenterError("affine is singular: cannot orient the volume")
    cosines = rot / norms  # column j: world direction of source axis j
    axes = [-1, -1, -1]
    flips = [False, False, False]
    remaining = np.abs(cosines).copy()
    for _ in range(3):
        world, source = np.unravel_index(int(np.argmax(remaining)), remaining.shape)
        axes[world] = int(source)
        flips[world] = bool(cosines[world, source] < 0)
        remaining[world, :] = -1.0
        remaining[:, source] = -1.0
    return (axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2])


def to_canonical(image: NDArray[Any], affine_lps: NDArray[np.float64]) -> CanonicalVolume:
    """Permute/flip *image* (any 3D array) into canonical LPS-aligned axes; no interpolation.

    The canonical image is a view of *image*, not a copy: each segmenter copies it into its own layout anyway.
    """
    if image.ndim != 3:
        raise SegmenterError(f"expected a 3D volume, got shape {image.shape}")
    affine_lps = np.asarray(affine_lps, dtype=np.float64)
    axes, flips = canonical_transform(affine_lps)
    out = np.transpose(image, axes)
    flip_axes = tuple(c for c in range(3) if flips[c])
    if flip_axes:
        out = np.flip(out, flip_axes)
    # canonical index c -> source index: source[axes[c]] = c or (n - 1 - c) when flipped
    to_source = np.zeros((4, 4))
    to_source[3, 3] = 1.0
    for c, (src, flipped) in enumerate(zip(axes, flips, strict=True)):
        if flipped:
            to_source[src, c] = -1.0
            to_source[src, 3] = image.shape[src] - 1
        else:
            to_source[src, c] = 1.0
    affine = affine_lps @ to_source
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return CanonicalVolume(
        image=out,
        affine=affine,
        spacing=(spacing[0], spacing[1], spacing[2]),
        axes=axes,
        flips=flips,
        source_shape=(int(image.shape[0]), int(image.shape[1]), int(image.shape[2])),
    )


def from_canonical(array: NDArray[Any], canonical: CanonicalVolume) -> NDArray[Any]:
    """Undo :func:`to_canonical` for an array on the canonical grid (e.g. a label map); a view, not a copy."""
    if array.shape != canonical.image.shape:
        raise SegmenterError(f"array shape {array.shape} is not the canonical shape {canonical.image.shape}")
    flip_axes = tuple(c for c in range(3) if canonical.flips[c])
    out = np.flip(array, flip_axes) if flip_axes else array
    return np.transpose(out, np.argsort(canonical.axes))


# --------------------------------------------------------------------------------------------- post-processing


# (medial, lateral) canonical labels of the tissues that come in one per compartment
_PAIRS = tuple(
    (BY_NAME[f"medial_{name}"].label, BY_NAME[f"lateral_{name}"].label)
    for name in ("tibial_cartilage", "meniscus")
)


def split_medial_lateral(labels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Assign tibial cartilage and menisci to the medial or lateral compartment by anatomy, in place.

    *labels* are canonical (axis 0 = patient right→left); tibial cartilage and menisci of both compartments
    may carry either label of their pair. The compartments are the two clusters of the x coordinates of those
    voxels (Otsu threshold); the medial one is the longer front to back (the medial tibial plateau is longer
    than the lateral, in real knees as in the phantoms), so no metadata is needed to tell the knees apart.
    """
    for medial, lateral in _PAIRS:
        labels[labels == lateral] = medial
    # Compares and slices along x only: np.isin and masks broadcast along x are several times slower on a
    # transposed (Fortran-ordered) array, the layout nnU-Net's output comes in.
    combined = labels == _PAIRS[0][0]
    for medial, _ in _PAIRS[1:]:
        combined |= labels == medial
    if not combined.any():
        return labels
    counts = combined.sum(axis=(1, 2)).astype(np.float64)
    threshold = _otsu_1d(np.arange(labels.shape[0], dtype=np.float64), counts)
    cut = int(np.floor(threshold)) + 1  # side b: x > threshold
    # anteroposterior length of each compartment (10th to 90th percentile of y): the medial plateau is the
    # longer; the menisci's thick rims make this insensitive to how thin cartilage happened to be sampled, and
    # the inner percentiles to a model's over-segmented tail (measured: a tail 13 voxels past the lateral
    # meniscus turned the 2nd-98th percentile extent around on a full-size coronal series)
    medial_is_b = _extent(combined[cut:]) > _extent(combined[:cut])
    lateral_side = labels[:cut] if medial_is_b else labels[cut:]  # a view: writes go to labels
    for medial, lateral in _PAIRS:
        lateral_side[lateral_side == medial] = lateral
    return labels


def _extent(mask: NDArray[np.bool_]) -> float:
    """Length (voxels) along y between the 10th and 90th percentile of *mask*'s voxels; 0 for an empty mask."""
    counts = mask.sum(axis=(0, 2)).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    cdf = np.cumsum(counts) / total
    return float(np.searchsorted(cdf, 0.90) - np.searchsorted(cdf, 0.10))


def _otsu_1d(values: NDArray[np.float64], weights: NDArray[np.float64]) -> float:
    """The threshold between *values* that maximises the between-class variance of the weighted histogram."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    total = w.sum()
    best, best_t = -1.0, float(v[len(v) // 2])
    cum_w = np.cumsum(w)
    cum_vw = np.cumsum(v * w)
    for i in range(len(v) - 1):
        w0 = cum_w[i]
        w1 = total - w0
        if w0 <= 0 or w1 <= 0:
            continue
        m0 = cum_vw[i] / w0
        m1 = (cum_vw[-1] - cum_vw[i]) / w1
        between = w0 * w1 * (m0 - m1) ** 2
        if between > best:
            best, best_t = between, float(v[i])
    return best_t


_BONES = tuple(t.label for t in BONES)
# bone_islands_removed finds bone voxels as 1 <= label <= len(_BONES) in one compare
assert tuple(range(1, len(_BONES) + 1)) == _BONES, _BONES
ISLAND_FRACTION = 0.2  # a bone's pieces smaller than this share of its largest are islands


def bone_islands_removed(labels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Clear the small islands of each bone, in place: face-connected pieces under
    :data:`ISLAND_FRACTION` of the bone's largest piece become background.

    Femur, tibia and patella are each one connected object; small islands apart from the main piece are false
    positives (speckle in the shafts or the fat pad) that add to the bone's volume, a SEG segment's extent and
    the cartilage analysis' search boxes. Pieces of comparable size are all kept: a model that splits a bone
    in two must not lose half of it (nnU-Net's own "largest component only" is decided per label on
    validation data for that reason).
    """
    import cc3d

    if not (labels.flags.c_contiguous or labels.flags.f_contiguous):
        labels[...] = bone_islands_removed(labels.copy(order="K"))
        return labels
    # One pass labels the pieces of every label value at once (cc3d; SciPy labels one mask per call, and a
    # few stray specks stretch the femur's box to most of the volume: 0.43 -> 0.19 s on a full-size knee).
    pieces, count = cc3d.connected_components(labels, connectivity=6, return_N=True)
    flat = labels.ravel(order="K")  # a view in memory order: writes go to labels
    # Only bone voxels matter: their flat positions, piece and bone (uint8 wrap-around: 0 -> 255).
    at = np.flatnonzero((flat - np.uint8(1)) < np.uint8(len(_BONES)))
    piece_of = pieces.ravel(order="K")[at]
    bone_of_piece = np.zeros(count + 1, dtype=np.uint8)
    bone_of_piece[piece_of] = flat[at]
    sizes = np.bincount(piece_of, minlength=count + 1)
    largest = np.zeros(256, dtype=np.int64)
    np.maximum.at(largest, bone_of_piece, sizes)
    small = sizes < ISLAND_FRACTION * largest[bone_of_piece]
    small[0] = False  # not a bone piece
    flat[at[small[piece_of]]] = 0
    return labels


#: a cartilage's pieces off its bone smaller than this share of its largest piece are islands
CARTILAGE_ISLAND_FRACTION = 0.5
# cartilage label -> the label of the bone it covers (0: not a cartilage)
_BONE_OF = np.zeros(256, dtype=np.uint8)
for _t in CARTILAGES:
    _BONE_OF[_t.label] = _t.bone or 0
_CARTILAGE_RANGE = (min(t.label for t in CARTILAGES), max(t.label for t in CARTILAGES))
assert set(range(_CARTILAGE_RANGE[0], _CARTILAGE_RANGE[1] + 1)) == {t.label for t in CARTILAGES}


def cartilage_islands_removed(labels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Clear the cartilage pieces that do not touch their own bone, in place, unless a piece is at least
    :data:`CARTILAGE_ISLAND_FRACTION` of its cartilage's largest piece.

    Cartilage covers bone: a piece away from it is a false positive (a demo model called 12,000 voxels behind
    a full-size knee "femoral cartilage", 7 % of the sheet), which adds to the volume, takes a subregion and
    pulls the thickness map's unrolling axis. Pieces are 26-connected; touching is across a voxel face, as
    the thickness rays start. A large detached piece is kept: a model that leaves a one-voxel gap between a
    condyle's cartilage and the bone must not lose that condyle.
    """
    import cc3d

    if labels.flags.f_contiguous and not labels.flags.c_contiguous:
        cartilage_islands_removed(labels.T)  # the same pieces, scanned along memory (nnU-Net's layout)
        return labels
    low, high = _CARTILAGE_RANGE
    box = _box((labels - np.uint8(low)) < np.uint8(high - low + 1))  # one compare (uint8 wrap-around)
    if box is None:
        return labels
    # The box grown by a voxel (the bone beyond a sheet at the box's edge), then padded with background, so
    # every cartilage voxel's six neighbours are in the array at fixed flat offsets.
    grown = tuple(
        slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(box, labels.shape, strict=True)
    )
    around = labels[grown]
    padded = np.pad(around, 1)
    only = np.where((padded - np.uint8(low)) < np.uint8(high - low + 1), padded, np.uint8(0))
    pieces, count = cc3d.connected_components(only, connectivity=26, return_N=True)
    if count <= 1:
        return labels
    at = np.flatnonzero(only)  # the cartilage voxels, a few percent of the box: the rest is not looked at
    piece_at = pieces.ravel()[at]
    label_at = only.ravel()[at]
    bone_at, flat = _BONE_OF[label_at], padded.ravel()
    rows, cols = padded.shape[1] * padded.shape[2], padded.shape[2]
    touching = np.zeros(count + 1, dtype=bool)
    for offset in (1, -1, cols, -cols, rows, -rows):
        hit = (bone_at != 0) & (flat[at + offset] == bone_at)
        touching[piece_at[hit]] = True
    sizes = np.bincount(piece_at, minlength=count + 1)
    label_of = np.zeros(count + 1, dtype=np.uint8)
    label_of[piece_at] = label_at
    largest = np.zeros(256, dtype=np.int64)
    np.maximum.at(largest, label_of[1:], sizes[1:])
    drop = ~touching & (sizes < CARTILAGE_ISLAND_FRACTION * largest[label_of])
    drop[0] = False
    if drop.any():
        gone = np.unravel_index(at[drop[piece_at]], padded.shape)
        around[tuple(g - 1 for g in gone)] = 0  # around is a view: writes go to labels
    return labels


def _box(mask: NDArray[np.bool_]) -> tuple[slice, ...] | None:
    """The bounding box of *mask* from its projections, or None when it is empty."""
    box = []
    for axis in range(mask.ndim):
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not len(along):
            return None
        box.append(slice(int(along[0]), int(along[-1]) + 1))
    return tuple(box)


# Registry step name -> in-place function on canonical labels (names are validated by the registry).
POSTPROCESS: dict[str, Callable[[NDArray[np.uint8]], NDArray[np.uint8]]] = {
    "remove_bone_islands": bone_islands_removed,
    "remove_cartilage_islands": cartilage_islands_removed,
    "split_medial_lateral": split_medial_lateral,
}
# Steps that also read the canonical image and its spacing: (labels, image, spacing) -> labels, in place.
IMAGE_POSTPROCESS: dict[
    str, Callable[[NDArray[np.uint8], NDArray[Any], tuple[float, float, float]], NDArray[np.uint8]]
] = {
    "refine_cartilage": refine_cartilage,
}
assert not set(POSTPROCESS) & set(IMAGE_POSTPROCESS)
assert set(POSTPROCESS) | set(IMAGE_POSTPROCESS) == set(POSTPROCESS_STEPS)


# --------------------------------------------------------------------------------------------- environment


def prepare_nnunet_env() -> None:
    """nnU-Net reads its folder variables from the environment (some versions at import time); inference needs
    none of them, so unset ones point at an empty temp dir instead of depending on the user's shell."""
    base = None
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(var):
            base = base or tempfile.mkdtemp(prefix="openmsk-nnunet-")
            os.environ[var] = os.path.join(base, var)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------- segmenters


class Segmenter(ABC):
    """A loaded model, created once per worker process and reused for every job (one job at a time: the
    progress bookkeeping is per instance)."""

    def __init__(self, entry: ModelEntry, device: str) -> None:
        self.entry = entry
        self.device = device
        self._lut = np.zeros(256, dtype=np.uint8)
        for model_label, canonical in entry.canonical_map.items():
            self._lut[model_label] = canonical

    @property
    def provenance(self) -> dict[str, Any]:
        """What produced a segmentation: model, weights, software versions, device — for the job record/SR."""
        import torch

        return {
            "model": self.entry.name,
            "kind": self.entry.kind,
            "version": self.entry.version,
            "weights_sha256": dict(self.entry.sha256),
            "torch": torch.__version__,
            "nnunetv2": _package_version("nnunetv2"),
            "device": self.device,
        }

    def segment(
        self, image: NDArray[Any], spacing: tuple[float, float, float], progress: Progress | None = None
    ) -> NDArray[np.uint8]:
        """Canonical labels (uint8, same shape) for a canonical volume ``(x, y, z)`` with *spacing* mm:
        :meth:`predict`, then :meth:`canonical_labels`."""
        return self.canonical_labels(self.predict(image, spacing, progress), image, spacing)

    def predict(
        self, image: NDArray[Any], spacing: tuple[float, float, float], progress: Progress | None = None
    ) -> NDArray[np.integer[Any]]:
        """The model's own label ids (same shape) for a canonical volume ``(x, y, z)`` with *spacing* mm.

        *progress* gets the fraction done, from 0 to 1. The worker times this as its ``infer`` stage and
        :meth:`canonical_labels` (label map and post-processing) as ``postprocess``.
        """
        if image.ndim != 3:
            raise SegmenterError(f"expected a 3D (x, y, z) volume, got shape {image.shape}")
        if len(spacing) != 3 or any(not (float(s) > 0) for s in spacing):
            raise SegmenterError(f"spacing must be three positive numbers, got {spacing!r}")
        report = progress or (lambda _fraction: None)
        report(0.0)
        labels = self._segment(np.asarray(image, dtype=np.float32), tuple(float(s) for s in spacing), report)
        if labels.shape != image.shape:
            raise SegmenterError(f"model returned shape {labels.shape} for input {image.shape}")
        report(1.0)
        return labels

    def canonical_labels(
        self,
        model_labels: NDArray[np.integer[Any]],
        image: NDArray[Any] | None = None,
        spacing: tuple[float, float, float] | None = None,
        steps: tuple[str, ...] | None = None,
    ) -> NDArray[np.uint8]:
        """The model's own label ids -> canonical labels: the registry's label map, then its post-processing
        steps (also for output of the same model produced elsewhere, e.g. by ``nnUNetv2_predict``).

        Image-aware steps (:data:`IMAGE_POSTPROCESS`) read the canonical *image* and *spacing*, which must then
        be given. *steps* overrides the registry's list (benchmarks compare with and without a step).
        """
        ids = np.asarray(model_labels)
        if ids.dtype != np.uint8:  # ids beyond 0..255 are no label of the map; uint8 indexes the LUT cheaply
            ids = np.clip(ids, 0, 255).astype(np.uint8)
        out = self._lut[ids]  # in the model's memory layout (nnU-Net's is the transpose): the steps take any
        for step in self.entry.postprocess if steps is None else steps:
            if step in IMAGE_POSTPROCESS:
                if image is None or spacing is None or image.shape != out.shape:
                    raise SegmenterError(
                        f"model {self.entry.name!r}: postprocess step {step!r} needs the canonical image "
                        f"of shape {out.shape}"
                    )
                IMAGE_POSTPROCESS[step](out, image, spacing)
            else:
                POSTPROCESS[step](out)
        return out

    @abstractmethod
    def _segment(
        self, image: NDArray[np.float32], spacing: tuple[float, float, float], progress: Progress
    ) -> NDArray[np.integer[Any]]:
        """Model label ids for *image* (x, y, z)."""


class _TileCounter:
    """Reports sliding-window progress of one nnU-Net predictor: counts network calls against the tile count.

    Wraps the predictor's slicer computation (to learn how many tiles this image has) and hooks the network
    forward; both are observation only, nnU-Net's prediction path is untouched.
    """

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.total = 0
        self.calls = 0
        self.callback: Callable[[float], None] | None = None
        original = predictor._internal_get_sliding_window_slicers

        def counting_slicers(image_size: tuple[int, ...]) -> list[Any]:
            slicers = original(image_size)
            axes = predictor.allowed_mirroring_axes if predictor.use_mirroring else None
            variants = 2 ** len(axes) if axes else 1
            self.total += len(slicers) * variants * len(predictor.list_of_parameters)
            return slicers

        predictor._internal_get_sliding_window_slicers = counting_slicers
        predictor.network.register_forward_hook(self._hook)

    def _hook(self, *_args: Any) -> None:
        self.calls += 1
        if self.callback is not None and self.total:
            self.callback(min(1.0, self.calls / self.total))

    def reset(self, callback: Callable[[float], None]) -> None:
        self.total = self.calls = 0
        self.callback = callback


class NnUNetSegmenter(Segmenter):
    """nnU-Net v2 predictors: ``nnunet`` has one configuration, ``nnunet_cascade`` lowres then fullres."""

    def __init__(self, entry: ModelEntry, device: str) -> None:
        super().__init__(entry, device)
        prepare_nnunet_env()
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self._predictors = []
        for configuration in entry.configurations:
            predictor = nnUNetPredictor(
                tile_step_size=0.5,
                use_gaussian=True,
                use_mirroring=True,
                perform_everything_on_device=device == "cuda",
                device=torch.device(device),
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
            try:
                predictor.initialize_from_trained_model_folder(
                    str(entry.configuration_dir(configuration)),
                    use_folds=tuple(entry.folds),
                    checkpoint_name=entry.checkpoint,
                )
            except Exception as exc:  # nnU-Net raises anything from KeyError to RuntimeError here
                raise SegmenterError(
                    f"model {entry.name!r}: nnU-Net could not load "
                    f"{entry.configuration_dir(configuration)}: {exc}"
                ) from exc
            self._predictors.append((predictor, _TileCounter(predictor)))

    def _segment(
        self, image: NDArray[np.float32], spacing: tuple[float, float, float], progress: Progress
    ) -> NDArray[np.integer[Any]]:
        # nnU-Net's numpy convention (SimpleITK order): (c, z, y, x) and spacing (sz, sy, sx).
        data = np.ascontiguousarray(image.transpose(2, 1, 0)[None])
        props = {"spacing": [spacing[2], spacing[1], spacing[0]]}
        previous = None
        n = len(self._predictors)
        seg: Any = None
        for stage, (predictor, counter) in enumerate(self._predictors):
            counter.reset(lambda f, stage=stage: progress(0.98 * (stage + f) / n))
            seg = predictor.predict_single_npy_array(
                data, dict(props), segmentation_previous_stage=previous, output_file_truncated=None
            )
            # the cascade's next stage takes this one's labels with a channel axis, in a signed dtype (nnU-Net
            # marks voxels outside the nonzero mask with -1 while cropping)
            previous = np.asarray(seg, dtype=np.int16)[None] if stage + 1 < n else None
        return np.asarray(seg).transpose(2, 1, 0)


class Slicewise2DSegmenter(Segmenter):
    """The DOSMA-style 2D U-Net applied to every sagittal slice (see :mod:`worker.models.slicewise2d`)."""

    def __init__(self, entry: ModelEntry, device: str) -> None:
        super().__init__(entry, device)
        from worker.models.slicewise2d import load_slicewise_model

        try:
            self._model = load_slicewise_model(entry.checkpoint_files()[0], device)
        except Exception as exc:
            raise SegmenterError(
                f"model {entry.name!r}: cannot load {entry.checkpoint_files()[0]}: {exc}"
            ) from exc

    def _segment(
        self, image: NDArray[np.float32], spacing: tuple[float, float, float], progress: Progress
    ) -> NDArray[np.integer[Any]]:
        return self._model.predict_volume(image, spacing, progress=lambda f: progress(0.98 * f))


def load_segmenter(entry: ModelEntry, device: str = "auto") -> Segmenter:
    """Verify *entry* (files, SHA-256) and load it on *device* (``auto``/``cpu``/``cuda``).

    Raises :class:`~openmsk.models.registry.RegistryError` for a model that fails verification and
    :class:`SegmenterError` for one that cannot be loaded or a device that is not there.
    """
    entry.verify()  # hashes are checked before any pickle is opened
    try:
        resolved = resolve_device(device)
    except DeviceError as exc:
        raise SegmenterError(str(exc)) from exc
    if entry.kind in ("nnunet", "nnunet_cascade"):
        return NnUNetSegmenter(entry, resolved)
    if entry.kind == "slicewise2d":
        return Slicewise2DSegmenter(entry, resolved)
    raise RegistryError(f"model {entry.name!r}: no segmenter for kind {entry.kind!r}")
