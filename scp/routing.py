"""Routing rules: which completed series go to which models and destinations, and which are ignored.

Rules live in a TOML file (``OPENMSK_ROUTING_RULES``; the documented default is ``scp/routing.toml``, whose
comments are the reference of the schema). They are tried in order; the first rule whose every condition
holds decides. A series that no rule matches is ignored. A rule that names ``model = "default"`` (or
``"default"`` in ``models``) gets the model registry's default model.

The same rules answer ``openmsk route test PATH``, which says for each series which rule matched and why every
other rule did not.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openmsk.config import Settings

LOG = logging.getLogger("openmsk.scp")

DEFAULT_MODEL = "default"  # the placeholder rules use for the registry's default model
FALLBACK_DEFAULT_MODEL = "nnunet_fullres"  # used when the model registry cannot be imported
PRIORITIES = ("urgent", "default")

_LIST_CONDITIONS = {
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "mr_acquisition_type": "MRAcquisitionType",
    "calling_ae": "calling AE",
    "called_ae": "called AE",
}
_KEYS = {
    "name",
    "models",
    "model",
    "ignore",
    "destinations",
    "priority",
    "series_description",
    "image_type_includes",
    "image_type_excludes",
    "min_instances",
    "max_instances",
    *_LIST_CONDITIONS,
}


class RoutingError(Exception):
    """The rules file is unusable; ``str()`` names the file and the rule."""


@dataclass(frozen=True)
class SeriesInfo:
    """What rules look at: the first instance's attributes, the instance count and who sent it to whom."""

    study_uid: str
    series_uid: str
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    mr_acquisition_type: str = ""
    image_type: tuple[str, ...] = ()
    instances: int = 0
    calling_ae: str = ""
    called_ae: str = ""


@dataclass(frozen=True)
class Rule:
    """One rule: conditions (None: not checked) and an action (models + destinations, or ignore)."""

    name: str
    models: tuple[str, ...] = ()
    ignore: bool = False
    destinations: tuple[str, ...] = ()
    priority: str = "default"
    modality: tuple[str, ...] | None = None
    body_part: tuple[str, ...] | None = None
    series_description: re.Pattern[str] | None = None
    mr_acquisition_type: tuple[str, ...] | None = None
    image_type_includes: tuple[str, ...] = ()
    image_type_excludes: tuple[str, ...] = ()
    min_instances: int | None = None
    max_instances: int | None = None
    calling_ae: tuple[str, ...] | None = None
    called_ae: tuple[str, ...] | None = None

    def mismatches(self, info: SeriesInfo) -> list[str]:
        """Why this rule does not match ``info`` (empty: it matches)."""
        reasons = []
        values = {
            "modality": info.modality,
            "body_part": info.body_part,
            "mr_acquisition_type": info.mr_acquisition_type,
            "calling_ae": info.calling_ae,
            "called_ae": info.called_ae,
        }
        for key, label in _LIST_CONDITIONS.items():
            wanted = getattr(self, key)
            if wanted is None:
                continue
            value = values[key].strip()
            value_cmp = value if key.endswith("_ae") else value.upper()
            if value_cmp not in wanted:
                reasons.append(f"{label} is {value!r}, not one of {list(wanted)}")
        if self.series_description is not None and not self.series_description.search(
            info.series_description
        ):
            pattern = self.series_description.pattern
            reasons.append(f"SeriesDescription {info.series_description!r} does not match /{pattern}/")
        image_type = set(info.image_type)
        missing = [v for v in self.image_type_includes if v not in image_type]
        if missing:
            reasons.append(f"ImageType {list(info.image_type)} lacks {missing}")
        present = [v for v in self.image_type_excludes if v in image_type]
        if present:
            reasons.append(f"ImageType {list(info.image_type)} has {present}")
        if self.min_instances is not None and info.instances < self.min_instances:
            reasons.append(f"{info.instances} instances, fewer than {self.min_instances}")
        if self.max_instances is not None and info.instances > self.max_instances:
            reasons.append(f"{info.instances} instances, more than {self.max_instances}")
        return reasons

    def describe_action(self) -> str:
        if self.ignore:
            return "ignore"
        where = f" → {', '.join(self.destinations)}" if self.destinations else ""
        return f"models {', '.join(self.models)}{where} (priority {self.priority})"


@dataclass(frozen=True)
class Decision:
    """The outcome of routing one series: the rule that matched (None: none did) and what every rule said."""

    rule: Rule | None
    verdicts: list[tuple[Rule, list[str]]] = field(default_factory=list)

    @property
    def ignore(self) -> bool:
        return self.rule is None or self.rule.ignore

    @property
    def models(self) -> tuple[str, ...]:
        return () if self.rule is None or self.rule.ignore else self.rule.models


@dataclass(frozen=True)
class RoutingRules:
    rules: tuple[Rule, ...]
    source: Path | None = None

    def route(self, info: SeriesInfo) -> Decision:
        """The first matching rule decides; every rule is still evaluated so the decision can be explained."""
        verdicts = [(rule, rule.mismatches(info)) for rule in self.rules]
        matched = next((rule for rule, reasons in verdicts if not reasons), None)
        return Decision(matched, verdicts)

    @classmethod
    def load(cls, path: Path, default_model: str, known_models: Iterable[str] | None = None) -> RoutingRules:
        """Read and check a rules file; ``default`` model names become ``default_model``.

        ``known_models`` (when given) is the set of installed models a rule may name.
        """
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise RoutingError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise RoutingError(f"{path}: not valid TOML ({exc})") from None
        return cls.from_dict(raw, default_model, known_models, source=Path(path))

    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        default_model: str,
        known_models: Iterable[str] | None = None,
        source: Path | None = None,
    ) -> RoutingRules:
        where = str(source) if source else "routing rules"
        extra = set(raw) - {"rules"}
        if extra:
            raise RoutingError(
                f"{where}: unknown top-level key(s) {sorted(extra)}; rules go in [[rules]] tables"
            )
        items = raw.get("rules", [])
        if not isinstance(items, list):
            raise RoutingError(f"{where}: 'rules' must be an array of tables ([[rules]])")
        known = set(known_models) if known_models is not None else None
        rules = []
        names: set[str] = set()
        for index, item in enumerate(items, 1):
            rule = _parse_rule(item, index, where, default_model, known)
            if rule.name in names:
                raise RoutingError(f"{where}: rule {index}: the name {rule.name!r} is used twice")
            names.add(rule.name)
            rules.append(rule)
        return cls(tuple(rules), source)


def _strings(value: Any, key: str, fail: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise fail(f"'{key}' must be a non-empty string or list of strings")
    return tuple(v.strip() for v in value)


def _parse_rule(item: Any, index: int, where: str, default_model: str, known: set[str] | None) -> Rule:
    if not isinstance(item, dict):
        raise RoutingError(f"{where}: rule {index} is not a table")
    label = f"rule {index}" + (f" ({item['name']!r})" if isinstance(item.get("name"), str) else "")

    def fail(message: str) -> RoutingError:
        return RoutingError(f"{where}: {label}: {message}")

    unknown = set(item) - _KEYS
    if unknown:
        raise fail(f"unknown key(s) {sorted(unknown)}")
    name = item.get("name", f"rule-{index}")
    if not isinstance(name, str) or not name.strip():
        raise fail("'name' must be a non-empty string")
    ignore = item.get("ignore", False)
    if not isinstance(ignore, bool):
        raise fail("'ignore' must be true or false")
    if "model" in item and "models" in item:
        raise fail("give 'model' or 'models', not both")
    models: tuple[str, ...] = ()
    if "model" in item or "models" in item:
        key = "model" if "model" in item else "models"
        models = tuple(default_model if m == DEFAULT_MODEL else m for m in _strings(item[key], key, fail))
    if ignore == bool(models):
        raise fail('needs either models (model = "..." / models = [...]) or ignore = true')
    if known is not None:
        missing = [m for m in models if m not in known]
        if missing:
            raise fail(f"unknown model(s) {missing}; installed: {sorted(known)}")
    destinations = _strings(item["destinations"], "destinations", fail) if "destinations" in item else ()
    if ignore and destinations:
        raise fail("an ignore rule has no destinations")
    priority = item.get("priority", "default")
    if priority not in PRIORITIES:
        raise fail(f"'priority' must be one of {list(PRIORITIES)}")

    conditions: dict[str, Any] = {}
    for key in _LIST_CONDITIONS:
        if key in item:
            values = _strings(item[key], key, fail)
            conditions[key] = values if key.endswith("_ae") else tuple(v.upper() for v in values)
    if "series_description" in item:
        pattern = item["series_description"]
        if not isinstance(pattern, str):
            raise fail("'series_description' must be a regular expression string")
        try:
            conditions["series_description"] = re.compile(pattern)
        except re.error as exc:
            raise fail(f"'series_description' is not a valid regular expression ({exc})") from None
    for key in ("image_type_includes", "image_type_excludes"):
        if key in item:
            conditions[key] = tuple(v.upper() for v in _strings(item[key], key, fail))
    for key in ("min_instances", "max_instances"):
        if key in item:
            value = item[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise fail(f"'{key}' must be a whole number >= 0")
            conditions[key] = value
    return Rule(
        name=name.strip(),
        models=models,
        ignore=ignore,
        destinations=destinations,
        priority=priority,
        **conditions,
    )


def resolve_default_model(settings: Settings) -> tuple[str, list[str] | None]:
    """The default model's name and the names of the models a rule may use (None: not checked).

    Both come from the model registry (``OPENMSK_MODEL_REGISTRY``, restricted to
    ``OPENMSK_AVAILABLE_MODELS``).
    Without a usable registry — the module not importable, or no registry file yet on a fresh node — the SCP
    still receives and routes: ``default`` means :data:`FALLBACK_DEFAULT_MODEL` and model names go unchecked
    (a job for a model that does not exist fails in the worker with a clear error).
    """
    try:
        from openmsk.models.registry import RegistryError, registry_for
    except ImportError:
        return FALLBACK_DEFAULT_MODEL, None
    try:
        registry = registry_for(settings)
        return registry.default.name, list(registry.names)
    except RegistryError as exc:
        LOG.warning("model registry unusable (%s); 'default' routes to %s", exc, FALLBACK_DEFAULT_MODEL)
        return FALLBACK_DEFAULT_MODEL, None


# -------------------------------------------------------------------------------------------- route test PATH


def series_from_files(paths: Sequence[Path]) -> list[SeriesInfo]:
    """Group DICOM files by series (files that are not DICOM are skipped), in the order first seen.

    The calling and called AE come from the file meta (Source / Receiving Application Entity Title) — what the
    SCP writes into the files it receives.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    tags = [
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "BodyPartExamined",
        "SeriesDescription",
        "MRAcquisitionType",
        "ImageType",
        "SpecificCharacterSet",
    ]
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        if not series:
            continue
        entry = found.setdefault((study, series), {"ds": ds, "sops": set(), "meta": ds.file_meta})
        entry["sops"].add(str(ds.get("SOPInstanceUID", path.name)))
    result = []
    for (study, series), entry in found.items():
        ds = entry["ds"]
        image_type = ds.get("ImageType", [])
        image_type = [image_type] if isinstance(image_type, str) else list(image_type)
        meta = entry["meta"]
        info = SeriesInfo(
            study_uid=study,
            series_uid=series,
            modality=str(ds.get("Modality", "")).upper(),
            body_part=str(ds.get("BodyPartExamined", "")).upper(),
            series_description=str(ds.get("SeriesDescription", "")),
            mr_acquisition_type=str(ds.get("MRAcquisitionType", "")).upper(),
            image_type=tuple(str(v).upper() for v in image_type),
            instances=len(entry["sops"]),
            calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip(),
            called_ae=str(meta.get("ReceivingApplicationEntityTitle", "") or "").strip(),
        )
        result.append(info)
    return result


def format_decision(info: SeriesInfo, decision: Decision) -> str:
    """The ``route test`` report of one series: its attributes, the deciding rule and every verdict."""
    image_type = "\\".join(info.image_type) or "-"
    lines = [
        f"series {info.series_uid}",
        f"  {info.modality or '-'} {info.mr_acquisition_type or '-'}  body part {info.body_part or '-'}  "
        f"{info.instances} instance(s)  ImageType {image_type}  "
        f"description {info.series_description!r}  calling AE {info.calling_ae or '-'}  "
        f"called AE {info.called_ae or '-'}",
    ]
    if decision.rule is None:
        lines.append("  => no rule matched: ignored")
    else:
        lines.append(f"  => rule {decision.rule.name!r}: {decision.rule.describe_action()}")
    seen_match = False
    for rule, reasons in decision.verdicts:
        if rule is decision.rule:
            lines.append(f"     [match] {rule.name}")
            seen_match = True
        elif not reasons:
            lines.append(f"     [later] {rule.name}: also matches, but {decision.rule.name!r} comes first")
        else:
            tag = "[after]" if seen_match else "[no]   "
            lines.append(f"     {tag} {rule.name}: {'; '.join(reasons)}")
    return "\n".join(lines)
