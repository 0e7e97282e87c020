"""``openmsk models``: list the registered models, install a trained nnU-Net model, train the demo models.

* ``openmsk models`` / ``openmsk models list`` — every offered model with its status (hashes checked);
* ``openmsk models install PATH [--name N]`` — a trained nnU-Net v2 results folder (an ``nnUNet_results``
  root, a dataset folder or one ``Trainer__Plans__configuration`` folder) or a zip exported by
  ``nnUNetv2_export_model_to_zip``: the files inference needs are copied next to the registry and an entry
  with their SHA-256 is written;
* ``openmsk models train-demo`` — see :mod:`worker.models.train_demo`.

Handlers return exit codes and import heavy modules only when they run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from dataclasses import replace as replace_fields
from pathlib import Path

from openmsk.labels import BONES, BY_NAME, CARTILAGES, TISSUES
from openmsk.models.registry import (
    CANONICAL_IDS,
    CASCADE_CONFIGURATIONS,
    COMBINED_TISSUES,
    ModelEntry,
    RegistryError,
    hash_files,
    load_registry,
    upsert_entry,
)

_TRAINED_FOLDER = re.compile(r"^(?P<trainer>[^_].*?)__(?P<plans>.+?)__(?P<configuration>[^_].*)$")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models`` and its actions to the ``openmsk`` command line."""
    parser = subparsers.add_parser(
        "models",
        help="list, install and train segmentation models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=_list)
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION")

    listing = actions.add_parser("list", help="list the offered models and whether each can be loaded")
    listing.set_defaults(func=_list)

    install = actions.add_parser(
        "install", help="install a trained nnU-Net v2 results folder or exported zip"
    )
    install.add_argument(
        "path", type=Path, help="an nnU-Net results folder or a zip from nnUNetv2_export_model_to_zip"
    )
    install.add_argument(
        "--name", help="the model's name in the registry (default: from dataset and configuration)"
    )
    install.add_argument(
        "--configuration", help="which configuration to install when the folder holds several"
    )
    install.add_argument(
        "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in fold_X"
    )
    install.add_argument(
        "--labels", help="model label id to tissue, e.g. '1=femur,2=tibia' (default: dataset.json)"
    )
    install.add_argument("--version", default="1", help="the model version to record")
    install.add_argument("--description", default="", help="a description for the model list")
    install.add_argument("--default", action="store_true", help="make it the default model")
    install.add_argument("--replace", action="store_true", help="overwrite a model of the same name")
    install.add_argument("--registry", type=Path, help="registry file (default: OPENMSK_MODEL_REGISTRY)")
    install.set_defaults(func=_install)

    from worker.models.train_demo import build_parser

    demo = actions.add_parser("train-demo", help="train the demo models on synthetic phantoms (CPU, minutes)")
    build_parser(demo)
    demo.set_defaults(func=_train_demo)


# --------------------------------------------------------------------------------------------- list


def _list(args: argparse.Namespace) -> int:
    from openmsk.config import load_settings
    from openmsk.models.registry import model_statuses

    settings = load_settings()
    try:
        statuses = model_statuses(settings)
    except RegistryError as exc:
        print(f"openmsk: {exc}", file=sys.stderr)
        print(
            "Install a model with `openmsk models install PATH` or `openmsk models train-demo`.",
            file=sys.stderr,
        )
        return 1
    print(f"registry: {settings.model_registry}")
    if not statuses:
        print("no models registered")
        return 1
    width = max(len(s["name"]) for s in statuses)
    for s in statuses:
        marker = "*" if s["default"] else " "
        print(
            f"{marker} {s['name']:<{width}}  {s['kind'] or '-':<15} {s['version'] or '-':<12} {s['status']}"
        )
    return 0 if all(s["status"] == "ok" for s in statuses) else 1


# --------------------------------------------------------------------------------------------- install


@dataclass(frozen=True)
class TrainedFolder:
    """One nnU-Net ``Trainer__Plans__configuration`` folder found in what is being installed."""

    path: Path
    dataset: str
    trainer: str
    plans: str
    configuration: str
    folds: tuple[int | str, ...]


def find_trained_folders(root: Path, checkpoint: str) -> list[TrainedFolder]:
    """Every ``Trainer__Plans__configuration`` folder under *root* (or *root* itself) with plans.json,
    dataset.json and at least one ``fold_X/<checkpoint>``."""
    candidates = [root] if _TRAINED_FOLDER.match(root.name) else []
    candidates += [p for p in sorted(root.rglob("*__*__*")) if p.is_dir()]
    found = []
    for path in candidates:
        match = _TRAINED_FOLDER.match(path.name)
        if not match or not (path / "plans.json").is_file() or not (path / "dataset.json").is_file():
            continue
        folds: list[int | str] = []
        for fold_dir in sorted(path.glob("fold_*")):
            suffix = fold_dir.name[len("fold_") :]
            if (fold_dir / checkpoint).is_file() and (suffix == "all" or suffix.isdigit()):
                folds.append("all" if suffix == "all" else int(suffix))
        if not folds:
            continue
        try:
            dataset = json.loads((path / "plans.json").read_text())["dataset_name"]
        except (ValueError, KeyError, TypeError):
            dataset = path.parent.name
        found.append(
            TrainedFolder(
                path, str(dataset), match["trainer"], match["plans"], match["configuration"], tuple(folds)
            )
        )
    return found


def _choose_stages(found: list[TrainedFolder], configuration: str | None) -> list[TrainedFolder]:
    """One configuration, or the two stages of a cascade; a clear error when the choice is ambiguous."""
    configurations = sorted({f.configuration for f in found})
    if configuration == "3d_cascade_fullres" or (
        configuration is None and set(configurations) == set(CASCADE_CONFIGURATIONS)
    ):
        stages = [next((f for f in found if f.configuration == c), None) for c in CASCADE_CONFIGURATIONS]
        if None in stages:
            raise RegistryError("a cascade needs both 3d_lowres and 3d_cascade_fullres folders")
        low, high = stages
        assert low is not None and high is not None
        if (low.dataset, low.trainer, low.plans) != (high.dataset, high.trainer, high.plans):
            raise RegistryError("the cascade's two stages come from different datasets, trainers or plans")
        return [low, high]
    if configuration is None:
        if len(found) > 1:
            raise RegistryError(
                f"found several trained configurations ({', '.join(configurations)}); "
                "choose one with --configuration"
            )
        return found
    chosen = [f for f in found if f.configuration == configuration]
    if len(chosen) != 1:
        raise RegistryError(
            f"configuration {configuration!r} found {len(chosen)} times; "
            f"available: {', '.join(configurations)}"
        )
    return chosen


def _label_map(dataset_json: Path, override: str | None) -> dict[int, str]:
    """Model label id -> canonical tissue, from ``--labels`` or the names in dataset.json."""
    if override:
        labels = {}
        for item in override.split(","):
            key, _, tissue = item.partition("=")
            try:
                labels[int(key.strip())] = tissue.strip()
            except ValueError:
                raise RegistryError(f"--labels item {item!r} is not ID=TISSUE") from None
        return labels
    raw = json.loads(dataset_json.read_text()).get("labels", {})
    labels = {}
    unknown = []
    for name, value in raw.items():
        if not isinstance(value, int):
            raise RegistryError(
                f"{dataset_json}: label {name!r} is a region; region-based models are not supported"
            )
        if value == 0:
            continue
        if name not in CANONICAL_IDS and name not in COMBINED_TISSUES:
            unknown.append(f"{value}={name}")
        labels[value] = name
    if unknown:
        raise RegistryError(
            f"{dataset_json}: label(s) {', '.join(unknown)} are not OpenMSK tissues "
            f"({', '.join([*CANONICAL_IDS, *COMBINED_TISSUES])}); map them with --labels"
        )
    return labels


def default_postprocess(label_map: dict[int, str]) -> tuple[str, ...]:
    """The post-processing an installed model gets (the registry entry can be edited afterwards): small bone
    islands cleared where it segments a bone (each bone is one piece); cartilage pieces off their bone
    cleared where it segments every covered bone with its cartilage (without the bone, no piece would touch
    it); and, where it segments tibial cartilage or menisci without compartments, the compartments assigned
    by anatomy."""
    tissues = set(label_map.values())
    steps: list[str] = []
    if tissues & {t.name for t in BONES}:
        steps.append("remove_bone_islands")
    bone_of = {t.name: TISSUES[t.bone].name for t in CARTILAGES if t.bone}
    bone_of["tibial_cartilage"] = TISSUES[BY_NAME["medial_tibial_cartilage"].bone or 0].name
    cartilages = tissues & set(bone_of)
    if cartilages and all(bone_of[name] in tissues for name in cartilages):
        steps.append("remove_cartilage_islands")
    if tissues & set(COMBINED_TISSUES):
        steps.append("split_medial_lateral")
    return tuple(steps)


def install_model(
    source: Path,
    registry_path: Path,
    name: str | None = None,
    configuration: str | None = None,
    checkpoint: str = "checkpoint_final.pth",
    labels: str | None = None,
    version: str = "1",
    description: str = "",
    default: bool = False,
    replace: bool = False,
) -> ModelEntry:
    """Copy a trained nnU-Net model (folder or exported zip) next to *registry_path* and register it.

    Only what inference reads is copied: plans.json, dataset.json and ``fold_X/<checkpoint>`` of each stage.
    Returns the new entry (already verified).
    """
    from openmsk.archive import UnsafeArchive, safe_extract

    source = source.expanduser().resolve()
    registry_path = registry_path.expanduser().resolve()
    models_dir = registry_path.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    if not source.exists():
        raise RegistryError(f"{source} does not exist")
    with tempfile.TemporaryDirectory(prefix=".install-", dir=models_dir) as staging:
        root = source
        if source.is_file():
            if source.suffix.lower() != ".zip":
                raise RegistryError(f"{source} is neither a folder nor a .zip")
            root = Path(staging) / "unzipped"
            try:
                safe_extract(source, root)
            except UnsafeArchive as exc:
                raise RegistryError(f"{source}: {exc}") from None
        found = find_trained_folders(root, checkpoint)
        if not found:
            raise RegistryError(
                f"{source}: no nnU-Net trained model (Trainer__Plans__configuration with plans.json, "
                f"dataset.json "
                f"and fold_X/{checkpoint}) found"
            )
        stages = _choose_stages(found, configuration)
        first = stages[0]
        kind = "nnunet_cascade" if len(stages) == 2 else "nnunet"
        folds = tuple(f for f in first.folds if all(f in s.folds for s in stages))
        if not folds:
            raise RegistryError("the cascade's stages have no fold in common")
        label_map = _label_map(stages[-1].path / "dataset.json", labels)
        postprocess = default_postprocess(label_map)
        name = name or _default_name(
            first.dataset, "cascade" if kind == "nnunet_cascade" else first.configuration
        )
        target = models_dir / name
        if target.exists() and not replace:
            raise RegistryError(f"{target} exists; pass --replace to overwrite model {name!r}")
        if not replace and registry_path.exists() and name in load_registry(registry_path).names:
            raise RegistryError(
                f"model {name!r} is already in {registry_path}; pass --replace to overwrite it"
            )
        build = Path(staging) / "model"
        files = []
        for stage in stages:
            dest = build / first.dataset / stage.path.name
            for rel in ("plans.json", "dataset.json", *(f"fold_{f}/{checkpoint}" for f in folds)):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(stage.path / rel, dest / rel)
                files.append(dest / rel)
        staged = ModelEntry(
            name=name,
            kind=kind,
            folder=build,
            labels=label_map,
            postprocess=postprocess,
            sha256=hash_files(build, files),
            version=version,
            description=description
            or f"nnU-Net v2 {first.dataset} " + " -> ".join(s.configuration for s in stages),
            default=default,
            dataset=first.dataset,
            trainer=first.trainer,
            plans=first.plans,
            configurations=tuple(s.configuration for s in stages),
            folds=folds,
            checkpoint=checkpoint,
        )
        staged.verify()  # before anything next to the registry changes
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(build), str(target))
    upsert_entry(registry_path, replace_fields(staged, folder=target), replace=replace)
    return load_registry(registry_path).get(name)


def _default_name(dataset: str, configuration: str) -> str:
    base = re.sub(r"^Dataset\d+_", "", dataset)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{base}_{configuration}").strip("_").lower()[:64] or "model"


def _install(args: argparse.Namespace) -> int:
    from openmsk.config import load_settings

    registry = args.registry or load_settings().model_registry
    try:
        entry = install_model(
            args.path,
            registry,
            name=args.name,
            configuration=args.configuration,
            checkpoint=args.checkpoint,
            labels=args.labels,
            version=args.version,
            description=args.description,
            default=args.default,
            replace=args.replace,
        )
    except RegistryError as exc:
        print(f"openmsk: {exc}", file=sys.stderr)
        return 1
    print(f"installed {entry.name} ({entry.kind}, {', '.join(entry.configurations)}) -> {entry.folder}")
    if entry.trainer != "nnUNetTrainer":
        print(f"note: nnU-Net must be able to import trainer class {entry.trainer} to load this model")
    print(f"registry: {Path(registry).resolve()}")
    return 0


# --------------------------------------------------------------------------------------------- train-demo


def _train_demo(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from worker.models.train_demo import to_argv

    env = dict(os.environ)
    env.setdefault(
        "OMP_WAIT_POLICY", "PASSIVE"
    )  # read when torch loads: must be set before the process starts
    return subprocess.call([sys.executable, "-m", "worker.models.train_demo", *to_argv(args)], env=env)
