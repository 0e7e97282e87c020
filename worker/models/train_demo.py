"""Train the demo models on synthetic phantoms: ``openmsk models train-demo`` (or ``python -m`` this module).

Three models, each small enough to ship in the repository and to train on two CPU cores in minutes:

* ``nnunet_fullres`` — nnU-Net v2 ``3d_fullres`` (a small PlainConvUNet);
* ``nnunet_cascade`` — nnU-Net v2 ``3d_lowres`` then ``3d_cascade_fullres``;
* ``dosma_2d`` — the DOSMA-style sagittal 2D U-Net of :mod:`worker.models.slicewise2d`.

Training data are phantoms (:mod:`openmsk.phantom`) of every acquisition plane and both knees, reoriented to the
canonical orientation the worker segments in (:func:`worker.models.segmenter.to_canonical`); one in
:data:`FULL_SIZE_EVERY` is full size (a clinical grid and field of view), the rest small. Their seeds start at
:data:`TRAIN_SEED_BASE`, far from the small seeds the tests evaluate on, and are listed in each model's
``training.json`` with their sizes.

The nnU-Net models go through nnU-Net's own pipeline: raw NIfTI dataset, fingerprint, ``ExperimentPlanner``
(whose plan is then narrowed to a network that trains on a CPU), its preprocessor, and a subclass of
``nnUNetTrainer`` constructed directly (nnU-Net's look-up of trainers by name imports torchvision, which is
broken next to the CPU torch). The subclass changes the schedule and optimiser (AdamW: a few hundred SGD steps
are far too few), restricts mirroring to left/right (up/down mirroring makes femur and tibia look alike) and
skips nnU-Net's final validation. What ships is a slim weights-only checkpoint whose ``trainer_name`` is
``nnUNetTrainer`` — the network is built from the plans, so ``nnUNetPredictor`` and ``nnUNetv2_predict`` load
it like any nnU-Net model.

The models learn tissues without medial/lateral (:data:`~openmsk.models.registry.COMPARTMENT_FREE_LABELS`, as
DOSMA's models do); their registry entries name the ``split_medial_lateral`` step, which assigns tibial
cartilage and menisci to a compartment by anatomy. Which side is medial depends on the knee, and a small
network trained for minutes does not learn that reliably from subtle asymmetries (measured: it labelled both
compartments medial), while the plateau anatomy tells it every time.

Reproducible: every random generator is seeded, data augmentation runs in the main process, and the shipped
weights come from ``--iterations`` (a wall-clock ``--budget-s`` adapts the schedule to the machine instead).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from openmsk.models.registry import COMPARTMENT_FREE_LABELS, ModelEntry, hash_files, upsert_entry
from worker.models.segmenter import to_canonical

DEMO_MODELS = ("nnunet_fullres", "nnunet_cascade", "dosma_2d")
DATASET_ID = 901
DATASET_NAME = "Dataset901_KneePhantom"
PLANS = "nnUNetPlans"
SHIPPED_TRAINER = "nnUNetTrainer"
TRAIN_SEED_BASE = 100_000  # training phantoms use seeds >= this; tests use small seeds
ORIENTATIONS = ("sagittal", "coronal", "axial", "oblique")
DEFAULT_CASES = 40
# One training case in this many is a full-size phantom (384 × 384 × 160 at 0.36 mm, a wider field of view
# than the small ones): models that saw only small phantoms lost the tibia on full-size series (Dice 0.55),
# because the input resampled to the network's 1.6 mm differs in extent and texture. The models resample
# these cases exactly as they resample a clinical series at inference.
FULL_SIZE_EVERY = 5
# Post-processing of the demo models' output: their few bone islands cleared (measured on full-size phantoms:
# femur Dice 0.947 -> 0.980, tibia 0.922 -> 0.970), cartilage pieces off their bone cleared (a 12,000-voxel
# "femoral cartilage" piece behind a full-size knee), medial/lateral assigned by anatomy (see above), then the
# cartilage boundaries moved to the image's edges at its native resolution: the nets run at 1.6 mm and regress
# to the thickness they learnt (subregion error 3.3-25.3 % median on 16 full-size knees); refined, 0.8-5.1 %
# (bench/analysis.py --model --regions --cases).
DEMO_POSTPROCESS = (
    "remove_bone_islands",
    "remove_cartilage_islands",
    "split_medial_lateral",
    "refine_cartilage",
)
SLICE_WINDOW = 64  # px: the 2D net trains on windows of this size (a small phantom's whole plane)
# Measured on the phantoms: 1200 iterations give every tissue a margin over the Dice thresholds; the cascade's
# fullres stage needs more (it learns to use the lowres labels as well): at 1500 its lateral meniscus missed
# 0.75 on single unseen sagittal knees (0.728), at 3000 every tissue passes on every plane and knee.
# fullres at 4000 (0.4.0): the lowest Dice on the unseen test phantoms rose from 0.79-0.83 to 0.86-0.90 per
# phantom, and the full-size axial knee's worst subregion from +10.5 to +10.0 % (27 min on 2 cores).
DEFAULT_ITERATIONS = {"nnunet_fullres": 4000, "nnunet_cascade": 3000, "dosma_2d": 5000}
# cascade: iterations of 3d_lowres relative to 3d_cascade_fullres (they are several times cheaper)
LOWRES_FRACTION = 0.2
# 0.1.1: the cascade retrained with 3000 iterations; 0.2.0: refine_cartilage added; 0.3.0: cartilage islands;
# 0.4.0: fullres retrained with 4000 iterations
VERSION = "0.4.0-demo"
INITIAL_LR = 3e-3  # AdamW (see the trainer)
VAL_ITERATIONS = 2  # per epoch: only for the log's pseudo Dice
FULLRES_SPACING = 1.6  # mm, isotropic: the phantoms' in-plane spacing, so no plane is downsampled
LOWRES_SPACING = 3.2
MIRROR_AXES = (2,)  # network axes are (z, y, x) of the canonical volume: 2 = left/right

# Small networks: enough for phantom anatomy, cheap on a CPU, < 1.5 MB as float32. Medial vs lateral is left
# to the split_medial_lateral step, so a patch needs local context only: 40^3 voxels (64 mm) costs a third of a
# 32x64x64 patch per step here, and 64^3 about 5x (cache-bound) — iterations matter more on two cores.
FULLRES_ARCH = {
    "features": [8, 16, 32, 64],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "patch": [40, 40, 40],
    "batch": 2,
}
LOWRES_ARCH = {
    "features": [8, 16, 32, 64],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "patch": [32, 32, 32],
    "batch": 2,
}

Log = Callable[[str], None]


@dataclass(frozen=True)
class Case:
    """One training phantom in canonical orientation."""

    key: str
    seed: int
    orientation: str
    laterality: str
    image: np.ndarray  # canonical (x, y, z), uint16
    labels: np.ndarray  # canonical labels, uint8
    affine: np.ndarray  # canonical voxel -> LPS


def case_size(index: int) -> str:
    """Phantom size of training case *index*: every :data:`FULL_SIZE_EVERY`-th is full size."""
    return "full" if index % FULL_SIZE_EVERY == FULL_SIZE_EVERY - 1 else "small"


def training_cases(n_cases: int, seed_base: int = TRAIN_SEED_BASE) -> list[Case]:
    """*n_cases* phantoms cycling through the four planes and both knees, in canonical orientation; one in
    :data:`FULL_SIZE_EVERY` is full size (see there)."""
    from openmsk.phantom import generate

    cases = []
    for i in range(n_cases):
        seed = seed_base + i
        orientation = ORIENTATIONS[i % len(ORIENTATIONS)]
        laterality = "RL"[(i // len(ORIENTATIONS)) % 2]
        phantom = generate(seed, case_size(i), orientation, laterality)
        image = to_canonical(phantom.image, phantom.affine_lps)
        labels = to_canonical(phantom.labels, phantom.affine_lps)
        cases.append(
            Case(f"knee_{i:03d}", seed, orientation, laterality, image.image, labels.image, image.affine)
        )
    return cases


def compartment_free(labels: np.ndarray) -> np.ndarray:
    """Canonical labels -> :data:`COMPARTMENT_FREE_LABELS` (medial and lateral merged): what the demo models
    learn; ``split_medial_lateral`` restores the compartments after inference."""
    from openmsk.phantom import LABELS

    ids = {name: value for value, name in COMPARTMENT_FREE_LABELS.items()}
    lut = np.zeros(256, dtype=np.uint8)
    for value, name in LABELS.items():
        lut[value] = ids[name.removeprefix("medial_").removeprefix("lateral_")]
    return lut[labels]


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _set_threads() -> None:
    """One process, all cores for torch: on two cores, augmentation in worker processes buys nothing."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------- nnU-Net


def set_nnunet_environment(work: Path) -> None:
    """Point nnU-Net's folders at *work* (never the user's) and keep it single-process and uncompiled."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        path = work / var
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112 (nnU-Net's variable names)
    os.environ["nnUNet_def_n_proc"] = "1"  # noqa: SIM112
    os.environ["nnUNet_compile"] = "false"  # noqa: SIM112


def write_raw_dataset(cases: Sequence[Case], raw_root: Path) -> Path:
    """nnU-Net raw format: imagesTr/labelsTr NIfTI (canonical arrays, RAS affine) and dataset.json."""
    import nibabel as nib

    folder = raw_root / DATASET_NAME
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in cases:
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ case.affine  # NIfTI affines are RAS
        nib.save(
            nib.Nifti1Image(case.image.astype(np.uint16), ras),
            folder / "imagesTr" / f"{case.key}_0000.nii.gz",
        )
        nib.save(
            nib.Nifti1Image(compartment_free(case.labels), ras), folder / "labelsTr" / f"{case.key}.nii.gz"
        )
    dataset = {
        "name": "KneePhantom",
        "description": "OpenMSK synthetic knee phantoms, canonical (LPS-aligned) orientation",
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, **{name: value for value, name in COMPARTMENT_FREE_LABELS.items()}},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "SimpleITKIO",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


def _arch_kwargs(template: dict[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    n = len(arch["features"])
    kwargs = dict(template)
    kwargs.update(
        n_stages=n,
        features_per_stage=list(arch["features"]),
        kernel_sizes=[[3, 3, 3]] * n,
        strides=[list(s) for s in arch["strides"]],
        n_conv_per_stage=[2] * n,
        n_conv_per_stage_decoder=[2] * (n - 1),
    )
    return kwargs


def plan_dataset(log: Log) -> dict[str, Any]:
    """Fingerprint + nnU-Net's ExperimentPlanner, then narrow the plan to CPU-sized 3d_fullres/3d_lowres and
    add the cascade (the planner drops 3d_lowres for images this small)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.paths import nnUNet_preprocessed

    t0 = time.monotonic()
    # the planner sets torch threads from this, and 0 is invalid there
    os.environ["nnUNet_n_proc_DA"] = "1"  # noqa: SIM112
    DatasetFingerprintExtractor(DATASET_ID, 1, verbose=False).run(overwrite_existing=True)
    planner = ExperimentPlanner(DATASET_ID, suppress_transpose=True)
    plans = planner.plan_experiment()
    os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112

    fullres = dict(plans["configurations"]["3d_fullres"])
    arch = dict(fullres["architecture"])
    fullres.update(
        spacing=[FULLRES_SPACING] * 3,
        patch_size=FULLRES_ARCH["patch"],
        batch_size=FULLRES_ARCH["batch"],
        architecture={**arch, "arch_kwargs": _arch_kwargs(arch["arch_kwargs"], FULLRES_ARCH)},
    )
    lowres = dict(fullres)
    lowres.update(
        data_identifier=f"{PLANS}_3d_lowres",
        spacing=[LOWRES_SPACING] * 3,
        patch_size=LOWRES_ARCH["patch"],
        batch_size=LOWRES_ARCH["batch"],
        batch_dice=False,
        next_stage="3d_cascade_fullres",
        architecture={**arch, "arch_kwargs": _arch_kwargs(arch["arch_kwargs"], LOWRES_ARCH)},
    )
    plans["configurations"] = {
        "3d_fullres": fullres,
        "3d_lowres": lowres,
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
    }
    # canonical volumes keep their axis order; the mirror axis (left/right) must stay network axis 2
    plans["transpose_forward"] = [0, 1, 2]
    plans["transpose_backward"] = [0, 1, 2]
    plans_file = Path(nnUNet_preprocessed.require()) / DATASET_NAME / f"{PLANS}.json"
    plans_file.write_text(json.dumps(plans, indent=2))
    log(
        f"planned {DATASET_NAME} in {time.monotonic() - t0:.0f} s: 3d_fullres {FULLRES_ARCH}, 3d_lowres {LOWRES_ARCH}"
    )
    return plans


def preprocess(configuration: str, log: Log) -> None:
    """nnU-Net's DefaultPreprocessor, case by case in this process (its ``run`` spawns a pool)."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    t0 = time.monotonic()
    base = Path(nnUNet_preprocessed.require()) / DATASET_NAME
    plans_manager = PlansManager(json.loads((base / f"{PLANS}.json").read_text()))
    manager = plans_manager.get_configuration(configuration)
    dataset_json = json.loads((base / "dataset.json").read_text())
    out = base / manager.data_identifier
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    preprocessor = manager.preprocessor_class(verbose=False)
    dataset = get_filenames_of_train_images_and_targets(
        str(Path(nnUNet_raw.require()) / DATASET_NAME), dataset_json
    )
    for key, files in dataset.items():
        preprocessor.run_case_save(
            str(out / key), files["images"], files["label"], plans_manager, manager, dataset_json
        )
    log(f"preprocessed {len(dataset)} cases for {configuration} in {time.monotonic() - t0:.0f} s")


def _demo_trainer_class() -> type:
    """The nnUNetTrainer subclass (built lazily: importing nnU-Net is slow and needs the environment set)."""
    import torch
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerOpenMSKDemo(nnUNetTrainer):
        """nnUNetTrainer with a short schedule, left/right mirroring only, an optional time budget and no final
        validation. Its network comes from the plans, so checkpoints load as plain ``nnUNetTrainer``."""

        budget_s: float | None = None

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            rotation, dummy_2d, initial_patch, _mirror = (
                super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            )
            self.inference_allowed_mirroring_axes = MIRROR_AXES
            return rotation, dummy_2d, initial_patch, MIRROR_AXES

        def configure_optimizers(self):
            # nnU-Net's SGD (momentum 0.99, lr 0.01) is tuned for 250k iterations; for a few hundred, AdamW gets
            # there far sooner (measured: tibia still at Dice 0 after 500 SGD iterations). Same poly decay.
            optimizer = torch.optim.AdamW(
                self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay
            )
            return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

        def save_checkpoint(self, filename: str) -> None:
            # only the final one is used; skipping best/latest saves time and disk
            if filename.endswith("checkpoint_final.pth"):
                super().save_checkpoint(filename)

        def run_training(self) -> None:
            self.on_train_start()
            self.logger.plot_progress_png = lambda *_a, **_k: (
                None
            )  # a matplotlib figure per epoch costs seconds
            started = time.monotonic()
            while self.current_epoch < self.num_epochs:
                self.on_epoch_start()
                self.on_train_epoch_start()
                losses = [
                    self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)
                ]
                self.on_train_epoch_end(losses)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val = [
                        self.validation_step(next(self.dataloader_val))
                        for _ in range(self.num_val_iterations_per_epoch)
                    ]
                    self.on_validation_epoch_end(val)
                self.on_epoch_end()
                if self.budget_s is not None and self.current_epoch == 1:
                    # fit the schedule to the budget once the speed of this machine is known
                    per_epoch = time.monotonic() - started
                    fit = max(1, int(self.budget_s // max(per_epoch, 1e-6)))
                    self.num_epochs = min(self.num_epochs, fit)
                    self.lr_scheduler.max_steps = self.num_epochs
                    self.print_to_log_file(
                        f"budget {self.budget_s:.0f} s: {self.num_epochs} epochs of {per_epoch:.1f} s"
                    )
            self.on_train_end()

    return nnUNetTrainerOpenMSKDemo


def train_nnunet_configuration(
    configuration: str, iterations: int, budget_s: float | None, seed: int, log: Log
) -> Any:
    """Train one configuration on fold ``all``; returns the trainer (network in memory, output folder on disk)."""
    import torch
    from nnunetv2.paths import nnUNet_preprocessed

    base = Path(nnUNet_preprocessed.require()) / DATASET_NAME
    plans = json.loads((base / f"{PLANS}.json").read_text())
    plans["continue_training"] = False  # nnUNetTrainer pops this key (run_training.py normally sets it)
    dataset_json = json.loads((base / "dataset.json").read_text())
    _seed_everything(seed)
    trainer_class = _demo_trainer_class()
    trainer = trainer_class(
        plans=plans,
        configuration=configuration,
        fold="all",
        dataset_json=dataset_json,
        device=torch.device("cpu"),
    )
    per_epoch = min(100, iterations)
    trainer.num_iterations_per_epoch = per_epoch
    trainer.num_epochs = max(1, math.ceil(iterations / per_epoch))
    trainer.num_val_iterations_per_epoch = VAL_ITERATIONS
    trainer.initial_lr = INITIAL_LR
    trainer.budget_s = budget_s
    t0 = time.monotonic()
    trainer.run_training()
    log(
        f"trained {configuration}: {trainer.num_epochs} x {per_epoch} iterations in {time.monotonic() - t0:.0f} s"
    )
    return trainer


def predict_next_stage(lowres_trainer: Any, log: Log) -> None:
    """The cascade's fullres stage trains on the lowres stage's predictions of the training cases: write them
    where nnU-Net's trainer looks (``predicted_next_stage``), with nnU-Net's predictor and resampling."""
    import torch
    from nnunetv2.inference.export_prediction import resample_and_save
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    t0 = time.monotonic()
    trainer = lowres_trainer
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        trainer.network,
        trainer.plans_manager,
        trainer.configuration_manager,
        None,
        trainer.dataset_json,
        SHIPPED_TRAINER,
        MIRROR_AXES,
    )
    next_manager = trainer.plans_manager.get_configuration("3d_cascade_fullres")
    next_folder = Path(nnUNet_preprocessed.require()) / DATASET_NAME / next_manager.data_identifier
    next_class = infer_dataset_class(str(next_folder))
    out = Path(trainer.output_folder_base) / "predicted_next_stage" / "3d_cascade_fullres"
    out.mkdir(parents=True, exist_ok=True)
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder)
    for key in dataset.identifiers:
        data, _seg, _prev, properties = dataset.load_case(key)
        logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data[:]))).cpu()
        target_shape = next_class(str(next_folder), [key]).load_case(key)[0].shape[1:]
        resample_and_save(
            logits,
            list(target_shape),
            str(out / key),
            trainer.plans_manager,
            trainer.configuration_manager,
            properties,
            trainer.dataset_json,
            1,
            next_class,
        )
    log(f"predicted 3d_lowres on {len(dataset.identifiers)} training cases in {time.monotonic() - t0:.0f} s")


def export_nnunet(trainer: Any, configuration: str, model_dir: Path) -> list[Path]:
    """Copy plans/dataset json and write a slim checkpoint (weights, configuration, mirroring) for one stage."""
    import torch

    target = model_dir / DATASET_NAME / f"{SHIPPED_TRAINER}__{PLANS}__{configuration}"
    (target / "fold_all").mkdir(parents=True, exist_ok=True)
    source = Path(trainer.output_folder_base)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(source / name, target / name)
    network = trainer.network._orig_mod if hasattr(trainer.network, "_orig_mod") else trainer.network
    checkpoint = {
        "network_weights": network.state_dict(),  # shared storages (nnU-Net aliases modules) are saved once
        "trainer_name": SHIPPED_TRAINER,
        "init_args": {"configuration": configuration, "fold": "all"},
        "inference_allowed_mirroring_axes": MIRROR_AXES,
        "current_epoch": trainer.current_epoch,
    }
    torch.save(checkpoint, target / "fold_all" / "checkpoint_final.pth")
    return [target / "plans.json", target / "dataset.json", target / "fold_all" / "checkpoint_final.pth"]


# --------------------------------------------------------------------------------------------- 2D U-Net


def train_slicewise(
    cases: Sequence[Case], iterations: int, budget_s: float | None, seed: int, log: Log
) -> Any:
    """Train the sagittal 2D U-Net on every sagittal slice of the canonical training volumes."""
    import torch
    import torch.nn.functional as F

    from worker.models.slicewise2d import (
        SlicewiseConfig,
        UNet2D,
        normalise,
        resample,
        resampled_shape,
    )

    _seed_everything(seed)
    config = SlicewiseConfig()
    images, targets = [], []
    for case in cases:
        spacing = tuple(float(s) for s in np.linalg.norm(case.affine[:3, :3], axis=0))
        shape = resampled_shape(case.image.shape, spacing, config.target_spacing)
        image = resample(torch.from_numpy(normalise(case.image))[None], shape)[0]
        # labels resampled through one-hot probabilities, so thin sheets survive the change of grid
        net_labels = torch.from_numpy(compartment_free(case.labels).astype(np.int64))
        onehot = F.one_hot(net_labels, config.n_classes).permute(3, 0, 1, 2).float()
        target = resample(onehot, shape).argmax(0)
        images.append(image)
        targets.append(target)
    # Every sample trains on a WINDOW x WINDOW part of its slice that stays inside the slice's own content
    # (the net is fully convolutional): a small phantom's plane (<= 64 px at 1.6 mm) whole, a random part of a
    # full-size one's (up to 86 px). Slices are padded to one size only to be stacked.
    size = max(max(t.shape[1], t.shape[2]) for t in targets)
    xs, ys, extents = [], [], []
    for image, target in zip(images, targets, strict=True):
        for x in range(image.shape[0]):
            img2d, tgt2d = image[x], target[x]
            py, pz = size - img2d.shape[0], size - img2d.shape[1]
            xs.append(F.pad(img2d, (0, pz, 0, py), value=float(img2d.min())))
            ys.append(F.pad(tgt2d, (0, pz, 0, py), value=0))
            extents.append(img2d.shape)
    data = torch.stack(xs)[:, None]
    labels = torch.stack(ys)
    window = min(size, SLICE_WINDOW)
    # the last window start (row, column) of each slice that keeps the window inside its content
    last_start = torch.tensor([[max(0, h - window), max(0, w - window)] for h, w in extents])
    log(f"2D training set: {data.shape[0]} sagittal slices up to {size}x{size}, windows of {window}x{window}")

    network = UNet2D(config.features, config.n_classes)
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 24
    t0 = time.monotonic()
    total = iterations
    step = 0
    network.train()
    while step < total:
        lr = 3e-3 * (1 - step / total) ** 0.9
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(0, data.shape[0], (batch,))
        starts = (torch.rand(batch, 2) * (last_start[index] + 1)).long()
        crops = [(i, r, c) for i, (r, c) in zip(index.tolist(), starts.tolist(), strict=True)]
        x = torch.stack([data[i, :, r : r + window, c : c + window] for i, r, c in crops])
        y = torch.stack([labels[i, r : r + window, c : c + window] for i, r, c in crops])
        x, y = _augment_2d(x, y)
        logits = network(x)
        loss = F.cross_entropy(logits, y) + _soft_dice_loss(logits, y, config.n_classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0 or step == total:
            log(f"2D step {step}/{total} loss {loss.item():.4f} lr {lr:.5f} {time.monotonic() - t0:.0f} s")
        if budget_s is not None and step == 50:
            fit = int(budget_s / ((time.monotonic() - t0) / step))
            total = max(step, min(total, fit))
    network.eval()
    log(f"trained dosma_2d: {step} iterations in {time.monotonic() - t0:.0f} s")
    return network, config, step


def _soft_dice_loss(logits: Any, target: Any, n_classes: int) -> Any:
    import torch
    import torch.nn.functional as F

    probs = torch.softmax(logits, 1)
    onehot = F.one_hot(target, n_classes).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return 1 - dice[1:].mean()


def _augment_2d(x: Any, y: Any) -> tuple[Any, Any]:
    """Random in-plane rotation (±20°, covers oblique planning), scale, shift, intensity scale/offset, gamma and
    noise; no flips (up/down or front/back flips make no anatomical sense in a sagittal slice)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    angle = (torch.rand(n) * 2 - 1) * math.radians(20)
    scale = 1 + (torch.rand(n) * 2 - 1) * 0.15
    shift = (torch.rand(n, 2) * 2 - 1) * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    x = (
        F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        + background
    )
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[
        :, 0
    ].long()
    x = x * (1 + (torch.rand(n, 1, 1, 1) * 2 - 1) * 0.2) + (torch.rand(n, 1, 1, 1) * 2 - 1) * 0.2
    x = x + torch.randn_like(x) * torch.rand(n, 1, 1, 1) * 0.1
    return x, y


# --------------------------------------------------------------------------------------------- orchestration


def _write_training_json(model_dir: Path, info: dict[str, Any]) -> None:
    (model_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def train_demo(
    models: Sequence[str] = DEMO_MODELS,
    out_dir: Path | str = "models",
    iterations: int | None = None,
    budget_s: float | None = None,
    n_cases: int = DEFAULT_CASES,
    seed: int = 0,
    work_dir: Path | str | None = None,
    registry: Path | str | None = None,
    log: Log = print,
) -> list[ModelEntry]:
    """Train *models* into ``out_dir/<name>/`` and upsert their entries (with SHA-256) in *registry*
    (default ``out_dir/registry.toml``). *iterations* (per model; the cascade's lowres stage gets a fifth)
    or *budget_s* (seconds of training per model) override the defaults. Returns the new entries."""
    unknown = [m for m in models if m not in DEMO_MODELS]
    if unknown:
        raise ValueError(f"unknown demo model(s) {', '.join(unknown)}; choose from {', '.join(DEMO_MODELS)}")
    if iterations is not None and budget_s is not None:
        raise ValueError("give either iterations or budget_s, not both")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    registry_path = Path(registry).expanduser().resolve() if registry else out / "registry.toml"
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="openmsk-train-")) if work_dir is None else Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    set_nnunet_environment(work)
    _set_threads()
    entries: list[ModelEntry] = []
    try:
        t0 = time.monotonic()
        cases = training_cases(n_cases)
        log(
            f"generated {len(cases)} training phantoms (seeds {cases[0].seed}-{cases[-1].seed}) "
            f"in {time.monotonic() - t0:.0f} s"
        )
        common = {
            "training_seeds": [c.seed for c in cases],
            "orientations": sorted({c.orientation for c in cases}),
            "lateralities": sorted({c.laterality for c in cases}),
            "phantom_sizes": [case_size(i) for i in range(len(cases))],
            "orientation_handling": "canonical (to_canonical: LPS-aligned, nearest axis)",
            "seed": seed,
            "torch": version("torch"),
            "nnunetv2": version("nnunetv2"),
            "python": platform.python_version(),
            "cpu_threads": os.cpu_count(),
        }
        nnunet_models = [m for m in models if m != "dosma_2d"]
        if nnunet_models:
            from nnunetv2.paths import nnUNet_raw

            write_raw_dataset(cases, Path(nnUNet_raw.require()))
            plan_dataset(log)
            preprocess("3d_fullres", log)
            if "nnunet_cascade" in nnunet_models:
                preprocess("3d_lowres", log)
        for name in models:
            started = time.monotonic()
            n_iter = iterations if iterations is not None else DEFAULT_ITERATIONS[name]
            # built beside the shipped folder and swapped in when complete: an interrupted run leaves the
            # registered model as it was
            model_dir = out / f".{name}.training"
            if model_dir.exists():
                shutil.rmtree(model_dir)
            model_dir.mkdir(parents=True)
            info: dict[str, Any] = {"model": name, **common}
            if name == "nnunet_fullres":
                trainer = train_nnunet_configuration("3d_fullres", n_iter, budget_s, seed, log)
                files = export_nnunet(trainer, "3d_fullres", model_dir)
                info["iterations"] = {"3d_fullres": trainer.num_epochs * trainer.num_iterations_per_epoch}
                entry_kwargs: dict[str, Any] = {"kind": "nnunet", "configurations": ("3d_fullres",)}
                description = "nnU-Net v2 3d_fullres trained on synthetic phantoms (demo)"
            elif name == "nnunet_cascade":
                low_iter = max(1, int(n_iter * LOWRES_FRACTION))
                low_budget = budget_s * 0.15 if budget_s is not None else None
                low = train_nnunet_configuration("3d_lowres", low_iter, low_budget, seed, log)
                predict_next_stage(low, log)
                files = export_nnunet(low, "3d_lowres", model_dir)
                high_budget = budget_s * 0.85 if budget_s is not None else None
                high = train_nnunet_configuration("3d_cascade_fullres", n_iter, high_budget, seed, log)
                files += export_nnunet(high, "3d_cascade_fullres", model_dir)
                info["iterations"] = {
                    "3d_lowres": low.num_epochs * low.num_iterations_per_epoch,
                    "3d_cascade_fullres": high.num_epochs * high.num_iterations_per_epoch,
                }
                entry_kwargs = {
                    "kind": "nnunet_cascade",
                    "configurations": ("3d_lowres", "3d_cascade_fullres"),
                }
                description = (
                    "nnU-Net v2 cascade (3d_lowres -> 3d_cascade_fullres) trained on phantoms (demo)"
                )
            else:
                from worker.models.slicewise2d import save_slicewise_model

                network, config, steps = train_slicewise(cases, n_iter, budget_s, seed, log)
                checkpoint = model_dir / "model.pt"
                save_slicewise_model(checkpoint, network, config)
                files = [checkpoint]
                info["iterations"] = {"2d": steps}
                entry_kwargs = {"kind": "slicewise2d", "checkpoint": "model.pt"}
                description = "DOSMA-style sagittal 2D U-Net trained on phantoms (demo)"
            info["train_seconds"] = round(time.monotonic() - started, 1)
            _write_training_json(model_dir, info)
            if entry_kwargs["kind"] != "slicewise2d":
                entry_kwargs |= {
                    "dataset": DATASET_NAME,
                    "trainer": SHIPPED_TRAINER,
                    "plans": PLANS,
                    "folds": ("all",),
                }
            sha256 = hash_files(model_dir, files)  # relative to the model folder: valid after the swap
            final_dir = out / name
            if final_dir.exists():
                shutil.rmtree(final_dir)
            os.replace(model_dir, final_dir)
            files = [final_dir / f.relative_to(model_dir) for f in files]
            entry = ModelEntry(
                name=name,
                folder=final_dir,
                sha256=sha256,
                labels=dict(COMPARTMENT_FREE_LABELS),
                postprocess=DEMO_POSTPROCESS,
                version=VERSION,
                description=description,
                default=name == "nnunet_fullres",
                **entry_kwargs,
            )
            upsert_entry(registry_path, entry, replace=True)
            entries.append(entry)
            size_kb = sum(f.stat().st_size for f in files) / 1024
            log(f"{name}: {info['train_seconds']:.0f} s, weights {size_kb:.0f} KiB -> {final_dir}")
    finally:
        for name in models:  # what an interrupted model left behind (a finished one was moved into place)
            shutil.rmtree(out / f".{name}.training", ignore_errors=True)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return entries


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``train-demo`` (shared by ``openmsk models train-demo`` and ``python -m``)."""
    parser = parser or argparse.ArgumentParser(prog="python -m worker.models.train_demo", description=__doc__)
    parser.add_argument(
        "--model",
        action="append",
        choices=DEMO_MODELS,
        help="a model to train (repeatable; default: all three)",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--iterations", type=int, help="training iterations per model (default: per-model)")
    amount.add_argument("--budget-s", type=float, help="seconds of training per model (adapts the schedule)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the registry's folder)"
    )
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES, help="number of training phantoms")
    parser.add_argument("--seed", type=int, default=0, help="random seed of initialisation and augmentation")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep nnU-Net's raw/preprocessed/results here"
    )
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``train-demo`` for parsed *args*; returns an exit code."""
    out = args.out
    registry = None
    if out is None:  # next to the registry the node reads
        from openmsk.config import load_settings

        registry = load_settings().model_registry
        out = registry.parent
    if args.iterations is not None and args.iterations < 1:
        print("error: --iterations must be >= 1", file=sys.stderr)
        return 2
    if args.budget_s is not None and args.budget_s <= 0:
        print("error: --budget-s must be > 0", file=sys.stderr)
        return 2
    if args.cases < 2:
        print("error: --cases must be >= 2", file=sys.stderr)
        return 2
    started = time.monotonic()
    entries = train_demo(
        models=args.model or DEMO_MODELS,
        out_dir=out,
        iterations=args.iterations,
        budget_s=args.budget_s,
        n_cases=args.cases,
        seed=args.seed,
        work_dir=args.work_dir,
        registry=registry,
    )
    registry_path = registry or Path(out) / "registry.toml"
    print(
        f"trained {', '.join(e.name for e in entries)} in {time.monotonic() - started:.0f} s; "
        f"registry: {Path(registry_path).resolve()}"
    )
    return 0


def to_argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that reproduce *args* (``openmsk models train-demo`` re-runs itself as
    ``python -m worker.models.train_demo`` so that training gets a fresh process: its own nnU-Net environment,
    passive OpenMP waiting, and a ``__main__`` that nnU-Net's spawned workers can import)."""
    argv: list[str] = []
    for name in args.model or ():
        argv += ["--model", name]
    for flag, value in (
        ("--iterations", args.iterations),
        ("--budget-s", args.budget_s),
        ("--out", args.out),
        ("--work-dir", args.work_dir),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return [*argv, "--cases", str(args.cases), "--seed", str(args.seed)]


def main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":  # nnU-Net's fingerprinting starts spawn workers, which re-import the main module
    # OpenMP threads that spin while waiting double the CPU time of a step when another process competes for the
    # cores (this machine is shared); passive waiting must be chosen before torch loads libgomp.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
