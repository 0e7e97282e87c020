"""The shipped demo models segment phantoms they have never seen: Dice >= 0.95 for bones and >= 0.75 for every
cartilage and meniscus, for each model, on EVERY one of eight fresh small phantoms (each acquisition plane with
both knees) and one full-size phantom (384 x 384 x 160 at 0.36 x 0.36 x 0.7 mm, a clinical grid): not only
on average, as a user meets one knee at a time.

The phantoms go through the worker's path: ``to_canonical`` -> ``Segmenter.segment`` -> ``from_canonical``,
and Dice is measured against the phantom's own labels in the acquired orientation. The table of Dice per label
and phantom is printed for every model, pass or fail.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from openmsk.config import REPO_DIR
from openmsk.models.registry import load_registry
from openmsk.phantom import LABELS, Phantom, generate
from tests.quality import dice, threshold
from worker.models.segmenter import from_canonical, load_segmenter, to_canonical

REGISTRY = REPO_DIR / "models" / "registry.toml"
MODELS = ("nnunet_fullres", "nnunet_cascade", "dosma_2d")
# Seeds far below the training seeds (>= 100000, listed in each model's training.json).
CASES = (
    (11, "small", "sagittal", "R"),
    (12, "small", "coronal", "L"),
    (13, "small", "axial", "R"),
    (14, "small", "oblique", "L"),
    (15, "small", "sagittal", "L"),
    (17, "small", "coronal", "R"),
    (18, "small", "axial", "L"),
    (19, "small", "oblique", "R"),
    (16, "full", "axial", "R"),
)


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    return [generate(seed, size, orientation, laterality) for seed, size, orientation, laterality in CASES]


@pytest.mark.parametrize("name", MODELS)
def test_dice_on_unseen_phantoms(
    name: str, phantoms: list[Phantom], capsys: pytest.CaptureFixture[str]
) -> None:
    entry = load_registry(REGISTRY).get(name)
    training = json.loads((entry.folder / "training.json").read_text())
    assert not {case[0] for case in CASES} & set(training["training_seeds"]), "test phantoms were trained on"

    started = time.monotonic()
    segmenter = load_segmenter(entry, "cpu")
    load_s = time.monotonic() - started
    scores = np.zeros((len(phantoms), len(LABELS)))
    started = time.monotonic()
    for i, phantom in enumerate(phantoms):
        canonical = to_canonical(phantom.image, phantom.affine_lps)
        labels = from_canonical(segmenter.segment(canonical.image, canonical.spacing), canonical)
        assert labels.shape == phantom.labels.shape and labels.dtype == np.uint8
        for j, label in enumerate(LABELS):
            scores[i, j] = dice(labels == label, phantom.labels == label)
    infer_s = (time.monotonic() - started) / len(phantoms)

    means = scores.mean(axis=0)
    failures = []
    lines = [
        f"\n{name}: Dice on {len(phantoms)} unseen phantoms, * full size "
        f"(load {load_s:.1f} s, {infer_s:.2f} s/phantom)",
        f"  {'label':<26} {'mean':>5} {'min':>5}  "
        + " ".join(f"{o[:3]}{lat}{'*' if z == 'full' else ' '}" for _, z, o, lat in CASES),
    ]
    for j, (label, tissue) in enumerate(LABELS.items()):
        required = threshold(label)
        ok = scores[:, j].min() >= required
        lines.append(
            f"  {tissue:<26} {means[j]:.3f} {scores[:, j].min():.3f}  "
            + " ".join(f"{s:5.2f}" for s in scores[:, j])
            + ("" if ok else f"  < {required}")
        )
        for i, (_, size, orientation, laterality) in enumerate(CASES):
            if scores[i, j] < required:
                failures.append(
                    f"{tissue} {scores[i, j]:.3f} < {required} on {size} {orientation} {laterality}"
                )
    with capsys.disabled():
        print("\n".join(lines))
    assert not failures, f"{name}: " + "; ".join(failures)


@pytest.mark.parametrize("orientation", ["sagittal", "coronal", "axial", "oblique"])
@pytest.mark.parametrize("laterality", ["R", "L"])
def test_canonical_orientation_round_trip(orientation: str, laterality: str) -> None:
    """to_canonical only permutes/flips (exact inverse), its affine still maps each voxel to the same place,
    and the anatomy ends up upright with the knee's medial side where its laterality says."""
    phantom = generate(3, "small", orientation, laterality)
    canonical = to_canonical(phantom.labels, phantom.affine_lps)
    assert np.array_equal(from_canonical(canonical.image, canonical), phantom.labels)
    rotation = canonical.affine[:3, :3]
    assert np.all(np.argmax(np.abs(rotation), axis=0) == [0, 1, 2])  # axes follow L, P, S
    assert np.all(np.diag(rotation) > 0)
    assert sorted(canonical.spacing) == pytest.approx(sorted(phantom.spacing))
    index = np.array([5, 9, 13])
    world = canonical.affine @ np.append(index, 1.0)
    source = np.rint(np.linalg.solve(phantom.affine_lps, world)[:3]).astype(int)
    assert canonical.image[tuple(index)] == phantom.labels[tuple(source)]
    centroid_x = {label: np.nonzero(canonical.image == label)[0].mean() for label in (1, 2, 5, 6)}
    assert np.nonzero(canonical.image == 1)[2].mean() > np.nonzero(canonical.image == 2)[2].mean()  # femur up
    # right knee: medial is patient left (+x); left knee: medial is patient right
    assert (centroid_x[5] > centroid_x[6]) == (laterality == "R")
