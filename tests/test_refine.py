"""The image-aware cartilage refinement (worker.models.refine): pulled to the intensity edge, local, inert."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from openmsk.models.registry import POSTPROCESS_STEPS
from worker.models.refine import refine_cartilage
from worker.models.segmenter import IMAGE_POSTPROCESS, POSTPROCESS

FEMUR, FEMORAL_CARTILAGE = 1, 4
SPACING = (0.5, 0.5, 0.5)


def _slab_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bone (z < 20, dark cortex on top), cartilage z 20..27, fluid z 28..29, fat above; blurred, noisy."""
    shape = (40, 40, 48)
    z = np.arange(shape[2])[None, None, :]
    image = np.full(shape, 140.0, dtype=np.float32)  # fat
    image = np.where(z < 20, 330.0, image)  # marrow
    image = np.where((z >= 17) & (z < 20), 60.0, image)  # cortex
    image = np.where((z >= 20) & (z < 28), 720.0, image)  # cartilage
    image = np.where((z >= 28) & (z < 31), 1000.0, image)  # fluid
    image = ndi.uniform_filter(image.astype(np.float32), 3)
    image += np.random.default_rng(seed).normal(0, 15, shape).astype(np.float32)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[..., :20] = FEMUR
    truth[..., 20:28] = FEMORAL_CARTILAGE
    return truth, image


def test_a_shifted_label_is_pulled_to_the_intensity_edge() -> None:
    truth, image = _slab_volume()
    model = np.zeros_like(truth)
    model[..., :21] = FEMUR  # the model's cartilage starts one voxel late...
    model[..., 21:29] = FEMORAL_CARTILAGE  # ...and runs one voxel into the fluid
    out = refine_cartilage(model.copy(), image, SPACING)
    cart = out == FEMORAL_CARTILAGE
    assert (cart == (truth == FEMORAL_CARTILAGE)).mean() > 0.999
    assert ((out == FEMUR) == (truth == FEMUR)).mean() > 0.995  # what it gave up went back to bone
    assert np.median(cart.sum(axis=2)) == 8  # thickness in voxels, as drawn (the model had 8 too, shifted)


def test_labels_far_from_the_band_never_change() -> None:
    truth, image = _slab_volume(1)
    model = truth.copy()
    model[..., 22:26] = 0  # nonsense inside: the band is only next to the model's boundaries
    out = refine_cartilage(model.copy(), image, SPACING)
    cart = np.isin(model, [FEMORAL_CARTILAGE])
    near = ndi.binary_dilation(cart, iterations=2) & ~ndi.binary_erosion(cart, iterations=2)
    assert np.array_equal(out[~near], model[~near])


def test_a_volume_without_cartilage_is_unchanged() -> None:
    truth, image = _slab_volume()
    model = np.where(truth == FEMORAL_CARTILAGE, 0, truth).astype(np.uint8)
    out = refine_cartilage(model.copy(), image, SPACING)
    assert np.array_equal(out, model)


def test_shapes_must_match_and_the_step_is_registered() -> None:
    with pytest.raises(ValueError):
        refine_cartilage(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.float32), SPACING)
    assert "refine_cartilage" in POSTPROCESS_STEPS
    assert set(POSTPROCESS) | set(IMAGE_POSTPROCESS) == set(POSTPROCESS_STEPS)


def test_an_edge_next_to_fluid_grows_back_to_where_the_fluid_begins() -> None:
    """Cartilage's own edge next to fluid reads brighter than cartilage through the blur; a model one voxel
    short there gets it back (it lies between cartilage and clear fluid), and no more."""
    truth, image = _slab_volume(2)
    model = truth.copy()
    model[..., 27] = 0  # the model stops one voxel before the fluid
    out = refine_cartilage(model.copy(), image, SPACING)
    cart = out == FEMORAL_CARTILAGE
    assert (cart[..., 27]).mean() > 0.99
    assert cart[..., 28:].mean() < 0.001  # the fluid itself stays out (noise may flip a voxel or two)
    assert np.median(cart.sum(axis=2)) == 8


def test_the_shifted_slice_morphology_is_scipys() -> None:
    from worker.models.refine import _dilated, _eroded

    face = ndi.generate_binary_structure(3, 1)
    rng = np.random.default_rng(0)
    for _ in range(3):
        mask = ndi.binary_opening(rng.random((20, 25, 30)) > 0.4, face)
        for steps in (1, 2):
            assert np.array_equal(_eroded(mask, steps), ndi.binary_erosion(mask, face, iterations=steps))
            assert np.array_equal(_dilated(mask, steps), ndi.binary_dilation(mask, face, iterations=steps))
