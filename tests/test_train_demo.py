"""``train-demo`` end to end with a tiny budget, so the training path cannot rot: nnU-Net's planning and
preprocessing, the trainer subclass, the cascade's previous-stage predictions, the slim export, the registry
entries, and loading the result through the registry and the segmenter in a fresh process (where nnU-Net's
predictor must not import torchvision)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from openmsk.config import REPO_DIR
from openmsk.models.registry import COMPARTMENT_FREE_LABELS, load_registry

MODELS = ("nnunet_fullres", "nnunet_cascade", "dosma_2d")

LOAD_AND_SEGMENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from openmsk.models.registry import load_registry
    from worker.models.segmenter import from_canonical, load_segmenter, to_canonical
    from openmsk.phantom import generate

    registry = load_registry(sys.argv[1])
    phantom = generate(7, "small", "coronal", "L")
    canonical = to_canonical(phantom.image, phantom.affine_lps)
    out = {}
    for entry in registry.models:
        segmenter = load_segmenter(entry, "cpu")
        progress = []
        labels = segmenter.segment(canonical.image, canonical.spacing, progress.append)
        labels = from_canonical(labels, canonical)
        out[entry.name] = {
            "shape": list(labels.shape), "dtype": str(labels.dtype), "max": int(labels.max()),
            "progress": [progress[0], progress[-1], all(a <= b for a, b in zip(progress, progress[1:]))],
            "provenance": segmenter.provenance,
        }
    out["torchvision_imported"] = "torchvision" in sys.modules
    print("RESULT " + json.dumps(out))
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENMSK_", "nnUNet_"))}
    env["PYTHONPATH"] = str(REPO_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.timeout(400)
def test_train_demo_tiny_budget_loads_through_registry(tmp_path: Path) -> None:
    out = tmp_path / "models"
    command = [
        sys.executable,
        "-m",
        "worker.models.train_demo",
        "--iterations",
        "2",
        "--cases",
        "5",  # the fifth is full size: the mixed-size path (resampling, 2D windows) runs too
        "--out",
        str(out),
    ]
    for name in MODELS:
        command += ["--model", name]
    run = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=360)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    registry = load_registry(out / "registry.toml")
    assert registry.names == list(MODELS)
    assert registry.default.name == "nnunet_fullres"
    for entry in registry.models:
        entry.verify()  # every shipped file hashed and matching
        training = json.loads((entry.folder / "training.json").read_text())
        assert len(training["training_seeds"]) == 5 and min(training["training_seeds"]) >= 100_000
        assert training["phantom_sizes"] == ["small"] * 4 + ["full"]
        assert set(training["orientations"]) == {"sagittal", "coronal", "axial", "oblique"}
        # the demo models segment tissues; medial/lateral is assigned by anatomy afterwards
        assert entry.labels == COMPARTMENT_FREE_LABELS and entry.postprocess == (
            "remove_bone_islands",
            "remove_cartilage_islands",
            "split_medial_lateral",
            "refine_cartilage",
        )
    cascade = registry.get("nnunet_cascade")
    assert cascade.configurations == ("3d_lowres", "3d_cascade_fullres")
    for configuration in ("3d_lowres", "3d_cascade_fullres"):
        checkpoint = torch.load(
            cascade.configuration_dir(configuration) / "fold_all" / "checkpoint_final.pth",
            map_location="cpu",
            weights_only=False,
        )
        # slim: what nnUNetPredictor reads, nothing else; resolvable trainer; left/right mirroring only
        assert set(checkpoint) == {
            "network_weights",
            "trainer_name",
            "init_args",
            "inference_allowed_mirroring_axes",
            "current_epoch",
        }
        assert checkpoint["trainer_name"] == "nnUNetTrainer"
        assert checkpoint["init_args"]["configuration"] == configuration
        assert tuple(checkpoint["inference_allowed_mirroring_axes"]) == (2,)
    plans = json.loads((cascade.configuration_dir("3d_cascade_fullres") / "plans.json").read_text())
    assert plans["configurations"]["3d_cascade_fullres"]["previous_stage"] == "3d_lowres"
    assert plans["transpose_forward"] == [0, 1, 2]

    check = subprocess.run(
        [sys.executable, "-c", LOAD_AND_SEGMENT, str(out / "registry.toml")],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    result = json.loads(next(line for line in check.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result.pop("torchvision_imported") is False
    for name in MODELS:
        got = result[name]
        assert got["shape"] == [64, 64, 40] and got["dtype"] == "uint8" and got["max"] <= 9
        assert got["progress"] == [0.0, 1.0, True]
        provenance = got["provenance"]
        assert provenance["model"] == name and provenance["device"] == "cpu"
        assert provenance["weights_sha256"] == dict(registry.get(name).sha256)
        assert provenance["torch"] == torch.__version__ and provenance["nnunetv2"]
