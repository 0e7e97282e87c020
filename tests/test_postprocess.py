"""The registry's post-processing steps on canonical labels: bone islands cleared, compartments assigned by
anatomy."""

from __future__ import annotations

import numpy as np
import pytest

from openmsk.labels import BY_NAME
from openmsk.phantom import generate
from worker.models.segmenter import bone_islands_removed, split_medial_lateral, to_canonical

FEMUR, TIBIA, PATELLA = (BY_NAME[n].label for n in ("femur", "tibia", "patella"))
FEMORAL_CARTILAGE = BY_NAME["femoral_cartilage"].label


def test_small_bone_islands_are_cleared_and_large_pieces_kept() -> None:
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[2:20, 2:20, 2:20] = FEMUR  # the femur
    labels[30:32, 30:32, 30:32] = FEMUR  # an island: 8 voxels
    labels[22:30, 2:10, 2:10] = TIBIA  # a tibia the model split into two pieces of similar size
    labels[22:30, 12:19, 2:10] = TIBIA
    labels[35:37, 2:4, 2:4] = FEMORAL_CARTILAGE  # cartilage islands are not bone: untouched
    labels[36, 36, 36] = PATELLA  # a patella of one voxel is its own largest piece
    before = labels.copy()

    out = bone_islands_removed(labels)

    assert out is labels  # in place, as the registry's steps are
    assert not (labels[30:32, 30:32, 30:32]).any()
    changed = before != labels
    assert set(np.unique(before[changed])) == {FEMUR} and changed.sum() == 8
    assert (labels == TIBIA).sum() == (before == TIBIA).sum()
    assert (labels == FEMORAL_CARTILAGE).sum() == 8 and labels[36, 36, 36] == PATELLA


def test_no_bones_is_a_no_op() -> None:
    labels = np.full((8, 8, 8), FEMORAL_CARTILAGE, dtype=np.uint8)
    assert np.array_equal(bone_islands_removed(labels.copy()), labels)


@pytest.mark.parametrize("laterality", ["R", "L"])
@pytest.mark.parametrize("orientation", ["sagittal", "axial"])
def test_split_restores_the_compartments_of_both_knees(orientation: str, laterality: str) -> None:
    phantom = generate(21, "small", orientation, laterality)
    truth = to_canonical(phantom.labels, phantom.affine_lps).image.copy()
    merged = truth.copy()
    for tissue in ("tibial_cartilage", "meniscus"):  # what a compartment-free model outputs
        merged[merged == BY_NAME[f"lateral_{tissue}"].label] = BY_NAME[f"medial_{tissue}"].label
    split = split_medial_lateral(merged)
    for tissue in ("tibial_cartilage", "meniscus"):
        for side in ("medial", "lateral"):
            label = BY_NAME[f"{side}_{tissue}"].label
            agree = np.count_nonzero((split == label) & (truth == label))
            assert agree / np.count_nonzero(truth == label) > 0.98, (side, tissue)


@pytest.mark.parametrize("order", ["C", "F", "strided"])
def test_islands_agree_with_scipy_per_bone_labelling(order: str) -> None:
    """One multi-label pass (cc3d) clears what labelling each bone's mask on its own clears, in any layout."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(5)
    labels = np.zeros((48, 40, 36), dtype=np.uint8)
    labels[4:30, 4:30, 4:30] = FEMUR
    labels[32:46, 4:30, 4:30] = TIBIA
    labels[4:12, 32:38, 10:20] = PATELLA
    labels[30:32, 4:30, 4:30] = FEMORAL_CARTILAGE
    specks = rng.random(labels.shape) < 0.01  # scattered bone specks of every bone, some touching the bones
    labels[specks] = rng.choice([FEMUR, TIBIA, PATELLA], size=int(specks.sum()))
    expected = labels.copy()
    for bone in (FEMUR, TIBIA, PATELLA):
        pieces, _count = ndi.label(expected == bone)
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        expected[(expected == bone) & (sizes[pieces] < 0.2 * sizes.max())] = 0
    if order == "strided":
        big = np.zeros((96, 40, 36), dtype=np.uint8)
        big[::2] = labels
        work = big[::2]
    else:
        work = labels.copy(order=order)

    out = bone_islands_removed(work)

    assert out is work
    assert np.array_equal(work, expected)
    assert (expected != labels).sum() > 50  # the specks were there to clear
