"""Routing rules: which completed series go to which models and destinations, which are ignored, and where the
received images are archived.

Rules live in a TOML file (``OPENMSK_ROUTING_RULES``; the documented default is ``scp/routing.toml``, whose
comments are the reference of the schema). They are tried in order; the first rule whose every condition
holds decides. A series that no rule matches is ignored. A rule that names ``model = "default"`` (or
``"default"`` in ``models``) gets the model registry's default model.

Each rule is a typed model (:class:`Rule`), validated when the file is loaded; a bad value is one
:class:`RoutingError` line naming the file, the rule (index and name) and the key. The model lives in the
shared core because the SCP routes with it and the worker checks, at start, that the destinations the rules
name exist; ``scp.routing`` re-exports it with the ``route test`` helpers.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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


class RoutingError(Exception):
    """The rules file is unusable; ``str()`` is one line naming the file and the rule."""


# ------------------------------------------------------------------------------------------- value types


def _names(value: Any, *, allow_empty: bool = False, upper: bool = False) -> tuple[str, ...]:
    """A string or a list of strings → a tuple of stripped (optionally upper-cased) strings."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or (not value and not allow_empty)
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        kind = "a string or list of strings" if allow_empty else "a non-empty string or list of strings"
        raise ValueError(f"must be {kind}")
    return tuple(v.strip().upper() if upper else v.strip() for v in value)


def _pattern(value: Any) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a regular expression string")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc})") from None


Names = Annotated[tuple[str, ...], BeforeValidator(_names)]  # exact (AE titles, destination names)
UpperNames = Annotated[tuple[str, ...], BeforeValidator(lambda v: _names(v, upper=True))]  # case-insensitive
OptionalNames = Annotated[tuple[str, ...], BeforeValidator(lambda v: _names(v, allow_empty=True))]
Pattern = Annotated[re.Pattern[str], BeforeValidator(_pattern)]
Count = Annotated[StrictInt, Field(ge=0)]

# What a key expects, for errors pydantic raises itself (wrong type, not one of, missing); errors raised by the
# validators below carry their own text.
_EXPECTS = {
    "name": "must be a non-empty string",
    "ignore": "must be true or false",
    "priority": f"must be one of {list(PRIORITIES)}",
    "min_instances": "must be a whole number >= 0",
    "max_instances": "must be a whole number >= 0",
}


# ------------------------------------------------------------------------------------------------ models


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


class Rule(BaseModel, frozen=True, extra="forbid"):
    """One rule: conditions (None: not checked) and an action (models + destinations, or ignore), plus where
    the received images are archived (``archive``; None: the node's default)."""

    name: str
    models: tuple[str, ...] = ()
    ignore: StrictBool = False
    destinations: OptionalNames = ()  # [] is none, as leaving it out
    archive: OptionalNames | None = None
    priority: Literal["urgent", "default"] = "default"
    t2: StrictBool = True  # compute T2 when the series is multi-echo (qDESS, MESE)
    # MESE: leave echo 1 out of the fit (its stimulated-echo contribution biases T2 upward on some scanners)
    t2_skip_first_echo: StrictBool = False
    # qDESS parameters where the header lacks them (anonymised): used only for what the header does not give
    t2_parameters: dict[
        Literal["repetition_time_ms", "echo_time_ms", "flip_angle_deg", "gl_area", "tg_us"], float
    ] = Field(default_factory=dict)
    modality: UpperNames | None = None
    body_part: UpperNames | None = None
    series_description: Pattern | None = None
    mr_acquisition_type: UpperNames | None = None
    image_type_includes: UpperNames = ()
    image_type_excludes: UpperNames = ()
    min_instances: Count | None = None
    max_instances: Count | None = None
    calling_ae: Names | None = None
    called_ae: Names | None = None

    @model_validator(mode="before")
    @classmethod
    def _action(cls, data: Any, info: ValidationInfo) -> Any:
        """``model`` or ``models`` → ``models``, with ``default`` resolved and names checked (context:
        ``default_model``, ``known_models``); a missing ``name`` becomes ``rule-<index>``."""
        if not isinstance(data, dict):
            raise ValueError("must be a table ([[rules]])")
        unknown = set(data) - set(cls.model_fields) - {"model"}
        if unknown:  # before any other check, as a misspelt key explains the rest
            raise ValueError(f"unknown key(s) {sorted(unknown)}")
        context = info.context or {}
        data = dict(data)
        if "name" not in data:
            data["name"] = f"rule-{context.get('index', 1)}"
        if "model" in data and "models" in data:
            raise ValueError("give 'model' or 'models', not both")
        key = "model" if "model" in data else "models" if "models" in data else None
        if key is not None:
            try:
                models = _names(data.pop(key))
            except ValueError as exc:
                raise ValueError(f"'{key}' {exc}") from None
            default_model = context.get("default_model", DEFAULT_MODEL)
            models = tuple(default_model if m == DEFAULT_MODEL else m for m in models)
            known = context.get("known_models")
            if known is not None:
                missing = [m for m in models if m not in known]
                if missing:
                    raise ValueError(f"unknown model(s) {missing}; installed: {sorted(known)}")
            data["models"] = models
        return data

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(_EXPECTS["name"])
        return value.strip()

    @model_validator(mode="after")
    def _one_action(self) -> Rule:
        if self.ignore == bool(self.models):
            raise ValueError('needs either models (model = "..." / models = [...]) or ignore = true')
        if self.ignore and self.destinations:
            raise ValueError("an ignore rule has no destinations (it may still have an archive)")
        return self

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

    def describe_action(self, archive_default: Sequence[str] | None = None) -> str:
        """What the rule does, e.g. ``models a → orthanc (priority default); archive → orthanc``.

        The archive is shown when the rule sets one, or (resolved) when ``archive_default`` is given.
        """
        if self.ignore:
            action = "ignore"
        else:
            where = f" → {', '.join(self.destinations)}" if self.destinations else ""
            action = f"models {', '.join(self.models)}{where} (priority {self.priority})"
        return action + describe_archive(self.archive, archive_default)

    def named_destinations(self) -> list[str]:
        """Every destination this rule names itself: its ``destinations`` and its explicit ``archive``."""
        names = list(self.destinations)
        names += [name for name in self.archive or () if name not in names]
        return names


def describe_archive(archive: Sequence[str] | None, default: Sequence[str] | None) -> str:
    """``"; archive → a, b"``, ``"; no archive"``, or ``""`` (the default, not known here)."""
    names = archive if archive is not None else default
    if names is None:
        return ""
    return f"; archive → {', '.join(names)}" if names else "; no archive"


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

    @staticmethod
    def archive_for(decision: Decision, default: Sequence[str]) -> list[str]:
        """Where the received images of the decided series are forwarded: the matched rule's ``archive``, or
        ``default`` when the rule sets none or no rule matched (``archive = []`` gives ``[]``)."""
        if decision.rule is None or decision.rule.archive is None:
            return list(default)
        return list(decision.rule.archive)

    def named_destinations(self) -> dict[str, list[str]]:
        """Per rule name, the destinations it names (``destinations`` and explicit ``archive``)."""
        return {rule.name: rule.named_destinations() for rule in self.rules if rule.named_destinations()}

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
        raw: Mapping[str, Any],
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
        rules: list[Rule] = []
        names: set[str] = set()
        for index, item in enumerate(items, 1):
            label = f"rule {index}"
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                label += f" ({item['name']!r})"
            context = {"index": index, "default_model": default_model, "known_models": known}
            try:
                rule = Rule.model_validate(item, context=context)
            except ValidationError as exc:
                raise RoutingError(f"{where}: {label}: {_one_line(exc)}") from None
            if rule.name in names:
                raise RoutingError(f"{where}: {label}: the name {rule.name!r} is used twice")
            names.add(rule.name)
            rules.append(rule)
        return cls(tuple(rules), source)


def _one_line(exc: ValidationError) -> str:
    """The first problem of a rule's ValidationError as one line that names the key (no pydantic dump)."""
    first = exc.errors(include_url=False)[0]
    key = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "value_error":
        message = str(first["msg"]).removeprefix("Value error, ")
    elif key in _EXPECTS:
        message = _EXPECTS[key]
    else:
        message = f"is invalid ({first['msg']})"
    return f"'{key}' {message}" if key else message


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
