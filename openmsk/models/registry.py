"""The model registry: one TOML file that says which segmentation models exist, where their weights are and
how their labels map onto OpenMSK's canonical tissues.

The web (model list, ``/health``) and the worker (inference) both read this one file through
:func:`load_registry`, so a model name can never mean one set of weights in one process and another set in the
next. Every weight file carries a SHA-256 in the registry; :meth:`ModelEntry.verify` checks them before a
model is loaded (nnU-Net checkpoints are pickles: a file that is not the one registered must never be
unpickled).

File format (paths relative to the TOML file's directory unless absolute)::

    [[models]]
    name = "nnunet_fullres"
    kind = "nnunet"                      # nnunet | nnunet_cascade | slicewise2d
    folder = "nnunet_fullres"            # nnU-Net kinds: an nnUNet_results root
    dataset = "Dataset901_KneePhantom"   # nnU-Net kinds: the dataset folder under `folder`
    trainer = "nnUNetTrainer"
    plans = "nnUNetPlans"
    configurations = ["3d_fullres"]      # cascade: ["3d_lowres", "3d_cascade_fullres"]
    folds = ["all"]
    checkpoint = "checkpoint_final.pth"  # slicewise2d: the weights file, relative to `folder`
    postprocess = ["remove_bone_islands", "split_medial_lateral"]  # optional steps, in order: clear
                                         # small bone islands; (remove_cartilage_islands: cartilage off
                                         # its bone); assign medial/lateral by anatomy
    version = "1.0.0"
    description = "..."
    default = true

    [models.labels]                      # the model's own label id -> canonical tissue name
    1 = "femur"

    [models.sha256]                      # every weight/plan file, relative to `folder`
    "Dataset901_KneePhantom/nnUNetTrainer__nnUNetPlans__3d_fullres/plans.json" = "9f2c..."
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from openmsk.atomic import write_atomic
from openmsk.labels import BY_NAME, TISSUES

if TYPE_CHECKING:
    from openmsk.config import Settings

KINDS = ("nnunet", "nnunet_cascade", "slicewise2d")
NNUNET_KINDS = ("nnunet", "nnunet_cascade")
CASCADE_CONFIGURATIONS = ("3d_lowres", "3d_cascade_fullres")
# Named steps a model's output may go through after its label map (see worker.models.segmenter).
POSTPROCESS_STEPS = (
    "remove_bone_islands",
    "remove_cartilage_islands",
    "split_medial_lateral",
    "refine_cartilage",
)
# Canonical tissue names -> label values, from OpenMSK's one tissue table (openmsk.labels).
CANONICAL_IDS: dict[str, int] = {t.name: t.label for t in TISSUES.values()}
# Tissues a model may output without saying which compartment (DOSMA's convention); the split_medial_lateral
# step assigns them to the medial or lateral canonical label, so they are valid only with that step.
COMBINED_TISSUES: dict[str, int] = {
    "tibial_cartilage": BY_NAME["medial_tibial_cartilage"].label,
    "meniscus": BY_NAME["medial_meniscus"].label,
}
# The label table of such models (the demo models): one id per kind of tissue, medial/lateral left to the step.
COMPARTMENT_FREE_LABELS: dict[int, str] = {
    1: "femur",
    2: "tibia",
    3: "patella",
    4: "femoral_cartilage",
    5: "tibial_cartilage",
    6: "patellar_cartilage",
    7: "meniscus",
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_IDENT = re.compile(r"^[A-Za-z0-9_.-]+$")


class RegistryError(Exception):
    """The registry or one of its models is unusable; ``str()`` is one line naming the model and/or file."""


# --------------------------------------------------------------------------------------------------- hashing

_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def sha256_file(path: Path) -> str:
    """SHA-256 of *path*, cached by (path, mtime, size): ``/health`` must not re-hash weights each call."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _HASH_LOCK:
        cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = value
    return value


# --------------------------------------------------------------------------------------------------- entries


def _fold_dir(fold: int | str) -> str:
    return f"fold_{fold}"


@dataclass(frozen=True)
class ModelEntry:
    """One registered model. The constructor checks structure; :meth:`verify` checks the files on disk."""

    name: str
    kind: str
    folder: Path
    labels: Mapping[int, str] = field(hash=False)  # the model's label id -> tissue name
    sha256: Mapping[str, str] = field(hash=False)  # file relative to `folder` -> hex digest
    version: str = "0"
    description: str = ""
    default: bool = False
    checkpoint: str = "checkpoint_final.pth"
    dataset: str | None = None
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetPlans"
    configurations: tuple[str, ...] = ()
    folds: tuple[int | str, ...] = ()
    postprocess: tuple[str, ...] = ()
    source: Path | None = field(default=None, compare=False)  # the registry file, for messages

    def __post_init__(self) -> None:
        where = self._where()
        # read-only copies: an entry is shared by every job of a worker
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "sha256", MappingProxyType(dict(self.sha256)))
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise RegistryError(f"{where}: name {self.name!r} must be 1-64 letters, digits, '_', '.', '-'")
        if self.kind not in KINDS:
            raise RegistryError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(self.folder, Path) or not self.folder.is_absolute():
            raise RegistryError(f"{where}: folder {self.folder!r} must be an absolute Path after loading")
        for text_field in ("version", "description", "checkpoint", "trainer", "plans"):
            if not isinstance(getattr(self, text_field), str):
                raise RegistryError(f"{where}: {text_field} must be a string")
        if not isinstance(self.default, bool):
            raise RegistryError(f"{where}: default must be true or false")
        if not self.labels:
            raise RegistryError(f"{where}: labels is empty; map the model's label ids to canonical tissues")
        for label, tissue in self.labels.items():
            if not isinstance(label, int) or isinstance(label, bool) or label < 1 or label > 255:
                raise RegistryError(f"{where}: label id {label!r} must be an integer 1-255")
            if not isinstance(tissue, str):
                raise RegistryError(f"{where}: label {label} must name a tissue, got {tissue!r}")
        tissues = list(self.labels.values())
        if len(set(tissues)) != len(tissues):
            raise RegistryError(f"{where}: labels maps two model labels onto the same tissue")
        for rel, digest in self.sha256.items():
            if not isinstance(digest, str) or not _SHA256.match(digest):
                raise RegistryError(f"{where}: sha256 of {rel!r} is not 64 lowercase hex digits")
            _check_relative(rel, where)
        _check_relative(self.checkpoint, where)
        for step in self.postprocess:
            if step not in POSTPROCESS_STEPS:
                raise RegistryError(
                    f"{where}: postprocess step {step!r} is not one of {', '.join(POSTPROCESS_STEPS)}"
                )
        if self.kind in NNUNET_KINDS:
            self._check_nnunet_fields(where)
        elif self.configurations or self.folds:
            raise RegistryError(f"{where}: configurations/folds only apply to nnU-Net kinds")

    def _check_nnunet_fields(self, where: str) -> None:
        if not self.dataset or not _IDENT.match(self.dataset):
            raise RegistryError(f"{where}: dataset must name the nnU-Net dataset folder (DatasetXXX_Name)")
        for ident in (self.trainer, self.plans, *self.configurations):
            if not _IDENT.match(ident):
                raise RegistryError(f"{where}: {ident!r} is not a valid trainer/plans/configuration name")
        if self.kind == "nnunet" and len(self.configurations) != 1:
            raise RegistryError(f"{where}: kind nnunet needs exactly one configuration")
        if self.kind == "nnunet_cascade" and tuple(self.configurations) != CASCADE_CONFIGURATIONS:
            raise RegistryError(
                f"{where}: kind nnunet_cascade needs configurations {list(CASCADE_CONFIGURATIONS)}"
            )
        if not self.folds:
            raise RegistryError(f"{where}: folds is empty")
        for fold in self.folds:
            if not (fold == "all" or (isinstance(fold, int) and not isinstance(fold, bool) and fold >= 0)):
                raise RegistryError(f"{where}: fold {fold!r} must be a non-negative integer or 'all'")
        if "/" in self.checkpoint:
            raise RegistryError(
                f"{where}: checkpoint must be a file name inside fold_X, got {self.checkpoint!r}"
            )

    def _where(self) -> str:
        name = self.name if isinstance(self.name, str) else "?"
        return f"model {name!r} in {self.source}" if self.source else f"model {name!r}"

    # ---------------------------------------------------------------------------------------------- paths

    def configuration_dir(self, configuration: str) -> Path:
        """nnU-Net's trained-model folder of a configuration (``<dataset>/<trainer>__<plans>__<config>``)."""
        return self.folder / str(self.dataset) / f"{self.trainer}__{self.plans}__{configuration}"

    def checkpoint_files(self) -> list[Path]:
        """Every checkpoint this model loads."""
        if self.kind == "slicewise2d":
            return [self.folder / self.checkpoint]
        return [
            self.configuration_dir(c) / _fold_dir(f) / self.checkpoint
            for c in self.configurations
            for f in self.folds
        ]

    def required_files(self) -> list[Path]:
        """Every file inference reads; each must be hashed in the registry."""
        files: list[Path] = []
        if self.kind in NNUNET_KINDS:
            for configuration in self.configurations:
                files += [
                    self.configuration_dir(configuration) / "plans.json",
                    self.configuration_dir(configuration) / "dataset.json",
                ]
        return files + self.checkpoint_files()

    @property
    def canonical_map(self) -> dict[int, int]:
        """The model's label id -> canonical label id (raises for an unknown tissue).

        A combined tissue (``tibial_cartilage``, ``meniscus``) maps to its medial id; ``split_medial_lateral``
        then moves the lateral compartment's voxels to the lateral id.
        """
        out = {}
        for label, tissue in self.labels.items():
            if tissue in COMBINED_TISSUES:
                if "split_medial_lateral" not in self.postprocess:
                    raise RegistryError(
                        f"{self._where()}: label {label} names combined tissue {tissue!r}, which needs "
                        'postprocess = ["split_medial_lateral"]'
                    )
                out[label] = COMBINED_TISSUES[tissue]
                continue
            if tissue not in CANONICAL_IDS:
                raise RegistryError(
                    f"{self._where()}: label {label} names unknown tissue {tissue!r}; "
                    f"known tissues: {', '.join([*CANONICAL_IDS, *COMBINED_TISSUES])}"
                )
            out[label] = CANONICAL_IDS[tissue]
        return out

    # ---------------------------------------------------------------------------------------------- verify

    def verify(self) -> None:
        """Check that the model can be loaded as registered: folder, checkpoints, hashes, tissues.

        Raises :class:`RegistryError` with one line naming the model and the offending file.
        """
        where = self._where()
        if not self.folder.is_dir():
            raise RegistryError(f"{where}: model folder {self.folder} does not exist")
        _ = self.canonical_map  # unknown tissue names
        for checkpoint in self.checkpoint_files():
            if not checkpoint.is_file():
                raise RegistryError(f"{where}: no checkpoint: {checkpoint} is missing")
        for required in self.required_files():
            if not required.is_file():
                raise RegistryError(f"{where}: missing file {required}")
            if self._relative(required) not in self.sha256:
                raise RegistryError(f"{where}: file {required} has no SHA-256 in the registry")
        for rel, expected in self.sha256.items():
            path = self.folder / rel
            if not path.is_file():
                raise RegistryError(f"{where}: missing file {path}")
            actual = sha256_file(path)
            if actual != expected:
                raise RegistryError(
                    f"{where}: wrong SHA-256 for {path}: "
                    f"registry says {expected[:12]}…, file has {actual[:12]}…"
                )
        if self.kind in NNUNET_KINDS:
            for configuration in self.configurations:
                self._check_dataset_labels(self.configuration_dir(configuration) / "dataset.json")

    def _check_dataset_labels(self, dataset_json: Path) -> None:
        """Every foreground label the network can output must have a canonical meaning."""
        try:
            labels = json.loads(dataset_json.read_text())["labels"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"{self._where()}: unreadable labels in {dataset_json}: {exc}") from None
        for name, value in labels.items():
            if isinstance(value, int) and value > 0 and value not in self.labels:
                raise RegistryError(
                    f"{self._where()}: label {value} ({name!r}) of {dataset_json} "
                    "has no entry in the registry's labels"
                )

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.folder).as_posix()

    # ---------------------------------------------------------------------------------------------- TOML

    def to_toml_dict(self, registry_dir: Path) -> dict[str, Any]:
        """The entry as the registry file stores it (folder relative to *registry_dir* when inside it)."""
        try:
            folder = self.folder.relative_to(registry_dir.resolve()).as_posix()
        except ValueError:
            folder = str(self.folder)
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "folder": folder}
        if self.kind in NNUNET_KINDS:
            out |= {
                "dataset": self.dataset,
                "trainer": self.trainer,
                "plans": self.plans,
                "configurations": list(self.configurations),
                "folds": list(self.folds),
            }
        if self.postprocess:
            out["postprocess"] = list(self.postprocess)
        out |= {
            "checkpoint": self.checkpoint,
            "version": self.version,
            "description": self.description,
            "default": self.default,
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "sha256": dict(sorted(self.sha256.items())),
        }
        return out


def _check_relative(rel: str, where: str) -> None:
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        raise RegistryError(f"{where}: path {rel!r} must be relative to the model folder without '..'")


def entry_from_dict(raw: Mapping[str, Any], registry_dir: Path, source: Path | None = None) -> ModelEntry:
    """A :class:`ModelEntry` from one ``[[models]]`` table; relative folders resolve in *registry_dir*."""
    name = raw.get("name", "?")
    where = f"model {name!r} in {source}" if source else f"model {name!r}"
    known = {
        "name",
        "kind",
        "folder",
        "labels",
        "sha256",
        "version",
        "description",
        "default",
        "checkpoint",
        "dataset",
        "trainer",
        "plans",
        "configurations",
        "folds",
        "postprocess",
    }
    unknown = set(raw) - known
    if unknown:
        raise RegistryError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("name", "kind", "folder", "labels", "sha256"):
        if key not in raw:
            raise RegistryError(f"{where}: missing key {key!r}")
    if not isinstance(raw["folder"], str) or not raw["folder"]:
        raise RegistryError(f"{where}: folder must be a non-empty string")
    folder = Path(raw["folder"]).expanduser()
    folder = (folder if folder.is_absolute() else registry_dir / folder).resolve()
    labels_raw = raw["labels"]
    sha_raw = raw["sha256"]
    if not isinstance(labels_raw, dict) or not isinstance(sha_raw, dict):
        raise RegistryError(f"{where}: labels and sha256 must be tables")
    labels: dict[int, str] = {}
    for key, tissue in labels_raw.items():
        try:
            labels[int(key)] = tissue
        except ValueError:
            raise RegistryError(f"{where}: label id {key!r} is not an integer") from None
    for key in ("configurations", "folds", "postprocess"):
        if key in raw and not isinstance(raw[key], list):
            raise RegistryError(f"{where}: {key} must be a list")
    kwargs = {
        k: raw[k]
        for k in ("version", "description", "default", "checkpoint", "dataset", "trainer", "plans")
        if k in raw
    }
    return ModelEntry(
        name=raw["name"],
        kind=raw["kind"],
        folder=folder,
        labels=labels,
        sha256=dict(sha_raw),
        configurations=tuple(raw.get("configurations", ())),
        folds=tuple(raw.get("folds", ())),
        postprocess=tuple(raw.get("postprocess", ())),
        source=source,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Registry:
    """The parsed registry file: models in file order, unique names, at most one default."""

    path: Path
    models: tuple[ModelEntry, ...]

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RegistryError(f"{self.path}: model name(s) listed twice: {', '.join(duplicates)}")
        defaults = [m.name for m in self.models if m.default]
        if len(defaults) > 1:
            raise RegistryError(f"{self.path}: more than one default model: {', '.join(defaults)}")

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def get(self, name: str) -> ModelEntry:
        """The entry called *name*; :class:`RegistryError` naming it (and the known ones) otherwise."""
        for model in self.models:
            if model.name == name:
                return model
        known = ", ".join(self.names) or "none"
        raise RegistryError(f"unknown model {name!r}: not in registry {self.path} (known: {known})")

    @property
    def default(self) -> ModelEntry:
        """The model flagged ``default = true``, else the first; :class:`RegistryError` if there are none."""
        if not self.models:
            raise RegistryError(f"{self.path}: no models registered")
        return next((m for m in self.models if m.default), self.models[0])

    def restricted(self, names: Iterable[str] | None) -> Registry:
        """Only the models in *names* (``None``: all), e.g. ``settings.available_models``; unknown → error."""
        if names is None:
            return self
        wanted = [self.get(n) for n in dict.fromkeys(names)]
        return Registry(self.path, tuple(m for m in self.models if m in wanted))


def load_registry(path: str | Path) -> Registry:
    """Parse and structurally validate the registry TOML at *path* (files are checked by ``verify``)."""
    path = Path(path).expanduser().resolve()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"model registry {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"model registry {path} is not valid TOML: {exc}") from None
    unknown = set(data) - {"models"}
    if unknown:
        raise RegistryError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}")
    raw_models = data.get("models", [])
    if not isinstance(raw_models, list) or not all(isinstance(m, dict) for m in raw_models):
        raise RegistryError(f"{path}: 'models' must be an array of tables ([[models]])")
    return Registry(path, tuple(entry_from_dict(m, path.parent, source=path) for m in raw_models))


def registry_for(settings: Settings) -> Registry:
    """The registry named by the settings, restricted to ``settings.available_models``."""
    return load_registry(settings.model_registry).restricted(settings.available_models)


def model_statuses(settings: Settings) -> list[dict[str, Any]]:
    """One dict per offered model for ``/health`` and the model list: name, kind, version, description,
    default, status ("ok" or the error). A name in ``available_models`` that is not registered is listed with
    its error instead of failing the whole list; an unreadable registry raises :class:`RegistryError`.
    """
    registry = load_registry(settings.model_registry)
    names = settings.available_models if settings.available_models is not None else registry.names
    offered = [m for m in registry.models if m.name in names]
    default_name = Registry(registry.path, tuple(offered)).default.name if offered else None
    by_name = {m.name: m for m in offered}
    out: list[dict[str, Any]] = []
    for name in dict.fromkeys(names):
        model = by_name.get(name)
        if model is None:
            out.append(
                {
                    "name": name,
                    "kind": None,
                    "version": None,
                    "description": "",
                    "default": False,
                    "status": f"unknown model {name!r}: not in registry {registry.path}",
                }
            )
            continue
        try:
            model.verify()
            status = "ok"
        except RegistryError as exc:
            status = str(exc)
        out.append(
            {
                "name": model.name,
                "kind": model.kind,
                "version": model.version,
                "description": model.description,
                "default": model.name == default_name,
                "status": status,
            }
        )
    return out


# --------------------------------------------------------------------------------------------------- writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to the registry")


def _toml_key(key: str) -> str:
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else json.dumps(key)


def dumps_registry(entries: Iterable[ModelEntry], registry_dir: Path) -> str:
    """The registry file text for *entries* (the inverse of :func:`load_registry`)."""
    lines = [
        "# OpenMSK model registry: read by the web (model list) and the worker (inference).",
        "# Paths are relative to this file's directory. Every file a model loads has a SHA-256, checked at",
        "# load.",
        "# Written by `openmsk models install` / `openmsk models train-demo`.",
    ]
    for entry in entries:
        data = entry.to_toml_dict(registry_dir)
        lines += ["", "[[models]]"]
        for key, value in data.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {_toml_value(value)}")
        for key, value in data.items():
            if isinstance(value, dict):
                lines += ["", f"[models.{key}]"]
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def write_registry(path: str | Path, entries: Iterable[ModelEntry]) -> Registry:
    """Write *entries* to *path* atomically and return the registry as read back."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, dumps_registry(list(entries), path.parent))
    return load_registry(path)


def upsert_entry(path: str | Path, entry: ModelEntry, replace: bool = False) -> Registry:
    """Add *entry* to the registry at *path* (created if missing); an existing name needs ``replace=True``.

    A new default flag clears the old one so the file keeps a single default.
    """
    path = Path(path).expanduser().resolve()
    existing = list(load_registry(path).models) if path.exists() else []
    names = [m.name for m in existing]
    if entry.name in names and not replace:
        raise RegistryError(f"model {entry.name!r} is already in {path}; pass --replace to overwrite it")
    if entry.default:
        existing = [_with(m, default=False) for m in existing]
    if entry.name in names:
        existing[names.index(entry.name)] = entry
    else:
        existing.append(entry)
    return write_registry(path, existing)


def _with(entry: ModelEntry, **changes: Any) -> ModelEntry:
    from dataclasses import replace as dc_replace

    return dc_replace(entry, **changes)


def hash_files(folder: Path, files: Iterable[Path]) -> dict[str, str]:
    """``{path relative to folder: sha256}`` for *files* — what a registry entry's ``sha256`` table holds."""
    return {Path(f).resolve().relative_to(folder.resolve()).as_posix(): sha256_file(Path(f)) for f in files}
