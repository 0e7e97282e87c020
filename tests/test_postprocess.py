"""The registry's post-processing steps on canonical labels: bone islands and cartilage off its bone
cleared, compartments assigned by anatomy."""

from __future__ import annotations

import numpy as np
import pytest

from openmsk.labels import BY_NAME
from openmsk.phantom import generate
from worker.models.segmenter import (
    bone_islands_removed,
    cartilage_islands_removed,
    split_medial_lateral,
    to_canonical,
)

FEMUR, TIBIA, PATELLA = (BY_NAME[n].label for n in ("femur", "tibia", "patella"))
FEMORAL_CARTILAGE = BY_NAME["femoral_cartilage"].label
TIBIAL_CARTILAGE = BY_NAME["medial_tibial_cartilage"].label
PATELLAR_CARTILAGE = BY_NAME["patellar_cartilage"].label
MENISCUS = BY_NAME["medial_meniscus"].label


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


def _layout(labels: np.ndarray, order: str) -> np.ndarray:
    if order == "strided":
        big = np.zeros((labels.shape[0] * 2, *labels.shape[1:]), dtype=np.uint8)
        big[::2] = labels
        return big[::2]
    return labels.copy(order=order)


@pytest.mark.parametrize("order", ["C", "F", "strided"])
def test_cartilage_off_its_bone_is_cleared_and_large_pieces_kept(order: str) -> None:
    labels = np.zeros((48, 40, 36), dtype=np.uint8)
    labels[4:24, 4:36, 4:32] = FEMUR
    labels[24:26, 4:36, 4:32] = FEMORAL_CARTILAGE  # the sheet on the femur: 1,792 voxels
    labels[30:46, 4:36, 4:32] = TIBIA
    labels[28:30, 4:20, 4:32] = TIBIAL_CARTILAGE  # on the tibia
    labels[26:28, 4:20, 4:32] = MENISCUS  # menisci need no bone: untouched
    labels[0:2, 0:2, 0:2] = PATELLAR_CARTILAGE  # a patella's only cartilage is its own largest piece: kept
    cleared = {
        "far from the femur": np.s_[40:44, 37:39, 2:6],
        "at the femur's edge, no face shared": np.s_[2:4, 2:4, 10:14],
        "on the tibia, not on the femur": np.s_[46:48, 4:8, 4:8],
    }
    for where in cleared.values():
        labels[where] = FEMORAL_CARTILAGE
    labels[27:29, 20:36, 2:34] = FEMORAL_CARTILAGE  # detached, but over half the sheet (1,024 voxels): kept
    labels[20:22, 36:38, 4:32] = FEMORAL_CARTILAGE  # small, on the femur's face at y = 35: kept
    before = labels.copy()
    work = _layout(labels, order)

    out = cartilage_islands_removed(work)

    assert out is work
    changed = before != work
    assert set(np.unique(work[changed])) == {0}
    assert changed.sum() == sum(before[where].size for where in cleared.values())
    for why, where in cleared.items():
        assert not work[where].any(), why


@pytest.mark.parametrize("orientation", ["sagittal", "oblique"])
def test_phantom_truth_has_no_cartilage_islands(orientation: str) -> None:
    phantom = generate(7, "medium", orientation, "L")
    labels = phantom.labels.astype(np.uint8)
    assert np.array_equal(cartilage_islands_removed(labels.copy()), labels)
