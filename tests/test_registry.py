"""The model registry: a good file loads, and each way a model can be broken gives one clear error naming the
model and the file; ``openmsk models install`` turns an nnU-Net results folder or exported zip into an
entry."""

from __future__ import annotations

import argparse
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

from openmsk.config import REPO_DIR, load_settings
from openmsk.models.registry import (
    ModelEntry,
    RegistryError,
    hash_files,
    load_registry,
    model_statuses,
    write_registry,
)
from openmsk.phantom import LABELS
from worker.models import cli as models_cli

SHIPPED = REPO_DIR / "models" / "registry.toml"
DATASET = "Dataset950_Test"
TRAINED = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def _results_folder(
    root: Path, labels: dict[str, int] | None = None, folds: tuple[str, ...] = ("0",)
) -> Path:
    """A minimal nnU-Net results layout: nnUNet_results/<dataset>/<trainer__plans__config>/fold_X/..."""
    trained = root / DATASET / TRAINED
    trained.mkdir(parents=True)
    labels = labels or {"background": 0, **{name: value for value, name in LABELS.items()}}
    (trained / "plans.json").write_text(json.dumps({"dataset_name": DATASET, "plans_name": "nnUNetPlans"}))
    (trained / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": {"0": "MRI"}}))
    for fold in folds:
        (trained / f"fold_{fold}").mkdir()
        (trained / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(os.urandom(256))
        (trained / f"fold_{fold}" / "progress.png").write_bytes(b"not needed for inference")
    return trained


def _nnunet_entry(models: Path, name: str = "knee", **changes: object) -> ModelEntry:
    folder = models / name
    trained = _results_folder(folder)
    files = [trained / "plans.json", trained / "dataset.json", trained / "fold_0" / "checkpoint_final.pth"]
    fields: dict[str, object] = {
        "name": name,
        "kind": "nnunet",
        "folder": folder,
        "labels": dict(LABELS),
        "sha256": hash_files(folder, files),
        "dataset": DATASET,
        "configurations": ("3d_fullres",),
        "folds": (0,),
        "version": "2.0",
        "default": True,
    }
    fields.update(changes)
    return ModelEntry(**fields)  # type: ignore[arg-type]


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    path = models / "registry.toml"
    write_registry(path, [_nnunet_entry(models)])
    return path


def test_good_registry_loads_and_verifies(registry: Path) -> None:
    loaded = load_registry(registry)
    assert loaded.names == ["knee"]
    entry = loaded.get("knee")
    assert entry.default and loaded.default is entry
    assert entry.folder == registry.parent / "knee"  # relative folder resolved against the TOML's directory
    assert 'folder = "knee"' in registry.read_text()
    assert entry.canonical_map == {k: k for k in LABELS}
    entry.verify()
    statuses = model_statuses(load_settings(model_registry=registry))
    assert statuses == [
        {
            "name": "knee",
            "kind": "nnunet",
            "version": "2.0",
            "description": "",
            "default": True,
            "status": "ok",
        }
    ]


def test_unknown_model_name_names_it(registry: Path) -> None:
    with pytest.raises(RegistryError, match=r"unknown model 'nope'.*registry.toml.*known: knee"):
        load_registry(registry).get("nope")
    statuses = model_statuses(load_settings(model_registry=registry, available_models="knee,nope"))
    assert statuses[0]["status"] == "ok"
    assert statuses[1]["name"] == "nope" and "unknown model 'nope'" in statuses[1]["status"]


def test_wrong_sha256_names_the_file(registry: Path) -> None:
    entry = load_registry(registry).get("knee")
    entry.verify()  # warms the hash cache: a later change must still be seen
    checkpoint = entry.folder / DATASET / TRAINED / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(os.urandom(256))  # same size, new content
    with pytest.raises(RegistryError) as err:
        entry.verify()
    message = str(err.value)
    assert "wrong SHA-256" in message and str(checkpoint) in message and "'knee'" in message
    status = model_statuses(load_settings(model_registry=registry))[0]["status"]
    assert status == message


def test_missing_file_names_it(registry: Path) -> None:
    entry = load_registry(registry).get("knee")
    plans = entry.folder / DATASET / TRAINED / "plans.json"
    plans.unlink()
    with pytest.raises(RegistryError, match=rf"'knee'.*missing file {plans}"):
        entry.verify()


def test_missing_checkpoint_is_reported(registry: Path) -> None:
    entry = load_registry(registry).get("knee")
    checkpoint = entry.folder / DATASET / TRAINED / "fold_0" / "checkpoint_final.pth"
    checkpoint.unlink()
    with pytest.raises(RegistryError, match=rf"'knee'.*no checkpoint: {checkpoint} is missing"):
        entry.verify()


def test_unknown_tissue_is_reported(tmp_path: Path) -> None:
    models = tmp_path / "models"
    path = models / "registry.toml"
    write_registry(path, [_nnunet_entry(models, labels={**LABELS, 4: "cartilage"})])
    entry = load_registry(path).get("knee")
    with pytest.raises(
        RegistryError, match=r"'knee' in .*registry.toml: label 4 names unknown tissue 'cartilage'"
    ):
        entry.verify()


def test_combined_tissue_needs_the_split_step(tmp_path: Path) -> None:
    models = tmp_path / "models"
    labels = {1: "femur", 2: "tibial_cartilage"}
    path = models / "registry.toml"
    write_registry(path, [_nnunet_entry(models, labels=labels)])
    with pytest.raises(
        RegistryError, match=r"label 2 names combined tissue 'tibial_cartilage'.*split_medial_lateral"
    ):
        load_registry(path).get("knee").verify()
    write_registry(
        path, [_nnunet_entry(models, "split", labels=labels, postprocess=("split_medial_lateral",))]
    )
    entry = load_registry(path).get("split")
    assert entry.postprocess == ("split_medial_lateral",)
    assert entry.canonical_map == {1: 1, 2: 5}  # medial id; the step moves the lateral compartment to 6


def test_unhashed_weight_file_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    entry = _nnunet_entry(models)
    rel = f"{DATASET}/{TRAINED}/fold_0/checkpoint_final.pth"
    unhashed = ModelEntry(**{**entry.__dict__, "sha256": {k: v for k, v in entry.sha256.items() if k != rel}})
    with pytest.raises(RegistryError, match=r"checkpoint_final.pth has no SHA-256 in the registry"):
        unhashed.verify()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[models]]\nname = 'a'\n", r"model 'a' in .*: missing key 'kind'"),
        (
            "[[models]]\nname = 'a'\nkind = 'keras'\nfolder = 'a'\n"
            "[models.labels]\n1 = 'femur'\n[models.sha256]\n",
            r"model 'a' in .*: kind 'keras' is not one of",
        ),
        ("models = 3\n", r"'models' must be an array of tables"),
        ("[[models\n", r"is not valid TOML"),
    ],
)
def test_structural_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=message):
        load_registry(path)


def test_missing_registry_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"model registry .*nothing.toml does not exist"):
        load_registry(tmp_path / "nothing.toml")


def test_duplicate_names_and_defaults_are_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    a = _nnunet_entry(models, "a")
    b = _nnunet_entry(models, "b")
    with pytest.raises(RegistryError, match="more than one default model: a, b"):
        write_registry(models / "registry.toml", [a, b])
    with pytest.raises(RegistryError, match="listed twice: a"):
        write_registry(models / "registry.toml", [a, a])


def test_shipped_registry_lists_the_demo_models() -> None:
    registry = load_registry(SHIPPED)
    assert registry.names == ["nnunet_fullres", "nnunet_cascade", "dosma_2d"]
    assert registry.default.name == "nnunet_fullres"
    kinds = {m.name: m.kind for m in registry.models}
    assert kinds == {
        "nnunet_fullres": "nnunet",
        "nnunet_cascade": "nnunet_cascade",
        "dosma_2d": "slicewise2d",
    }
    for model in registry.models:
        model.verify()
    statuses = model_statuses(load_settings(model_registry=SHIPPED, available_models="dosma_2d"))
    assert [(s["name"], s["default"], s["status"]) for s in statuses] == [("dosma_2d", True, "ok")]


# --------------------------------------------------------------------------------------------- install


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    models_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", *argv])
    return args.func(args)


def test_install_results_folder_writes_a_correct_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "nnUNet_results"
    _results_folder(results, folds=("0", "1"))
    registry = tmp_path / "site" / "registry.toml"
    assert (
        _run_cli("install", str(results), "--name", "site_knee", "--registry", str(registry), "--default")
        == 0
    )
    assert "installed site_knee" in capsys.readouterr().out
    entry = load_registry(registry).get("site_knee")
    assert (entry.kind, entry.dataset, entry.trainer, entry.plans) == (
        "nnunet",
        DATASET,
        "nnUNetTrainer",
        "nnUNetPlans",
    )
    assert entry.configurations == ("3d_fullres",) and entry.folds == (0, 1) and entry.default
    assert entry.folder == registry.parent / "site_knee"
    assert entry.labels == dict(LABELS)  # from dataset.json's names
    # bones and their cartilage, medial/lateral labels of its own: no split step
    assert entry.postprocess == ("remove_bone_islands", "remove_cartilage_islands")
    copied = sorted(p.relative_to(entry.folder).as_posix() for p in entry.folder.rglob("*") if p.is_file())
    expected = sorted(
        f"{DATASET}/{TRAINED}/{rel}"
        for rel in (
            "plans.json",
            "dataset.json",
            "fold_0/checkpoint_final.pth",
            "fold_1/checkpoint_final.pth",
        )
    )
    assert copied == expected  # only what inference reads; progress.png stays behind
    assert sorted(entry.sha256) == expected
    for rel, digest in entry.sha256.items():
        assert digest == hash_files(entry.folder, [entry.folder / rel])[rel]
    source = results / DATASET / TRAINED / "fold_1" / "checkpoint_final.pth"
    assert (
        entry.folder / DATASET / TRAINED / "fold_1" / "checkpoint_final.pth"
    ).read_bytes() == source.read_bytes()
    entry.verify()
    # installing again under the same name needs --replace
    assert _run_cli("install", str(results), "--name", "site_knee", "--registry", str(registry)) == 1
    assert "--replace" in capsys.readouterr().err


def test_install_refuses_unknown_tissues(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results"
    _results_folder(results, labels={"background": 0, "femur": 1, "bone_marrow_lesion": 2})
    registry = tmp_path / "registry.toml"
    assert _run_cli("install", str(results), "--registry", str(registry)) == 1
    assert "2=bone_marrow_lesion are not OpenMSK tissues" in capsys.readouterr().err
    assert not registry.exists()
    assert _run_cli("install", str(results), "--registry", str(registry), "--labels", "1=femur,2=tibia") == 0
    entry = load_registry(registry).get("test_3d_fullres")
    assert entry.labels == {1: "femur", 2: "tibia"}


def test_install_compartment_free_model_gets_the_split_step(tmp_path: Path) -> None:
    """A model with bones gets their islands cleared; one without compartments gets them by anatomy; its tibial
    cartilage without the tibia keeps every piece (none could touch the bone)."""
    results = tmp_path / "results"
    labels = {"background": 0, "femur": 1, "tibial_cartilage": 2, "meniscus": 3}
    _results_folder(results, labels=labels)
    registry = tmp_path / "registry.toml"
    assert _run_cli("install", str(results), "--registry", str(registry), "--name", "dosma_like") == 0
    entry = load_registry(registry).get("dosma_like")
    assert entry.postprocess == ("remove_bone_islands", "split_medial_lateral")
    assert entry.canonical_map == {1: 1, 2: 5, 3: 8}
    entry.verify()


def test_install_exported_zip(tmp_path: Path) -> None:
    results = tmp_path / "results"
    trained = _results_folder(results, folds=("all",))
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # the layout nnUNetv2_export_model_to_zip writes
        for path in trained.rglob("*"):
            zf.write(path, path.relative_to(results).as_posix())
    registry = tmp_path / "models" / "registry.toml"
    assert _run_cli("install", str(archive), "--registry", str(registry)) == 0
    entry = load_registry(registry).get("test_3d_fullres")
    assert entry.folds == ("all",)
    entry.verify()
    assert [p.name for p in registry.parent.iterdir() if p.name.startswith(".install-")] == []


@pytest.mark.parametrize("evil", ["../escape.txt", "/abs/escape.txt", "link"])
def test_install_zip_refuses_unsafe_entries(
    tmp_path: Path, evil: str, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    trained = _results_folder(results)
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in trained.rglob("*"):
            zf.write(path, path.relative_to(results).as_posix())
        if evil == "link":
            info = zipfile.ZipInfo(f"{DATASET}/{TRAINED}/fold_0/link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(evil, "x")
    registry = tmp_path / "models" / "registry.toml"
    assert _run_cli("install", str(archive), "--registry", str(registry)) == 1
    err = capsys.readouterr().err
    assert "outside the archive" in err or "symbolic link" in err
    assert not registry.exists()
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("name", ["nnunet_fullres", "nnunet_cascade"])
def test_install_shipped_model_folder_matches_its_entry(tmp_path: Path, name: str) -> None:
    """The shipped demo folders are real nnU-Net results folders: installing one reproduces its entry."""
    shipped = load_registry(SHIPPED).get(name)
    registry = tmp_path / "registry.toml"
    entry = models_cli.install_model(shipped.folder, registry, name="copy")
    assert (entry.kind, entry.configurations, entry.folds) == (shipped.kind, shipped.configurations, ("all",))
    # an installed model gets the default steps; the image-aware refinement is the demo models' own choice
    assert entry.labels == shipped.labels and entry.postprocess == (
        "remove_bone_islands",
        "remove_cartilage_islands",
        "split_medial_lateral",
    )
    assert shipped.postprocess == (*entry.postprocess, "refine_cartilage")
    assert entry.sha256 == dict(shipped.sha256)
