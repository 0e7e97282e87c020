"""Where results and received images go: a registry of destination types, and the destinations a site
configured.

A destination is configured by name in a TOML file (``OPENMSK_DESTINATIONS``); routing rules name destinations
(``destinations`` for results, ``archive`` for the received images). ``orthanc`` is always defined when an
Orthanc is configured (``OPENMSK_ORTHANC_URL``)::

    [destinations.pacs]            # any DICOM AE, over C-STORE
    type = "dicom"
    ae_title = "PACS"
    host = "10.0.0.5"
    port = 104

    [destinations.archive]         # DICOMweb STOW-RS
    type = "dicomweb"
    url = "https://pacs.example.org/dicom-web"

Every entry is read through the typed configuration of its type (:data:`DESTINATION_CONFIGS`) and checked when
the file is loaded: a bad entry is one :class:`DestinationConfigError` line naming the file, the destination
and the key. :func:`configured_destination_names` checks the file and connects nowhere; :func:`check_routing`
is the start-up check of the SCP and the worker that every destination the routing rules name exists.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, ValidationInfo, field_validator

from destinations.base import DeliveryError, Destination
from destinations.dicom import DicomDestination
from destinations.dicomweb import DicomWebDestination
from destinations.orthanc import OrthancDestination
from openmsk.config import Settings
from openmsk.routing import RoutingRules

DESTINATION_TYPES: dict[str, Callable[..., Destination]] = {
    "orthanc": OrthancDestination,
    "dicom": DicomDestination,
    "dicomweb": DicomWebDestination,
}
ORTHANC = "orthanc"  # the built-in destination of OPENMSK_ORTHANC_URL
LOG = logging.getLogger("openmsk.destinations")

# DICOM PS3.5 AE title: 1-16 characters of the default repertoire, no backslash, not only spaces.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class DestinationConfigError(ValueError):
    """The destinations file or one of its entries is unusable; ``str()`` is one line naming both."""


def _ae_title(value: Any) -> Any:
    if not isinstance(value, str) or not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("must be a DICOM AE title (1-16 characters, no backslash)")
    return value.strip()


def _text(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def _http_url(value: Any) -> Any:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ValueError("must be an http(s):// URL")
    return value


AETitle = Annotated[str, BeforeValidator(_ae_title)]
Text = Annotated[str, BeforeValidator(_text)]
HttpUrl = Annotated[str, BeforeValidator(_http_url)]
Port = Annotated[int, Field(ge=1, le=65535, strict=True)]

_EXPECTS = {  # for errors pydantic raises itself
    "port": "must be a TCP port (1-65535)",
    "dicom_port": "must be a TCP port (1-65535)",
    "user": "must be a string",
    "password": "must be a string",
}


class _Config(BaseModel, frozen=True, extra="forbid"):
    """The options of one destination type: exactly the keyword arguments of its constructor (less name)."""

    @field_validator("calling_ae_title", mode="before", check_fields=False)
    @classmethod
    def _calling_ae_title(cls, value: Any, info: ValidationInfo) -> Any:
        """Unset: the node's own AE title (validation context ``scp_ae_title``)."""
        if value is None:
            return (info.context or {}).get("scp_ae_title") or "OPENMSK"
        return _ae_title(value)


class DicomConfig(_Config):
    type: Literal["dicom"] = "dicom"
    ae_title: AETitle
    host: Text
    port: Port
    calling_ae_title: str = Field(None, validate_default=True)  # type: ignore[assignment]


class DicomWebConfig(_Config):
    type: Literal["dicomweb"] = "dicomweb"
    url: HttpUrl
    user: str | None = None
    password: str | None = None


class OrthancConfig(_Config):
    type: Literal["orthanc"] = "orthanc"
    url: HttpUrl
    user: str | None = None
    password: str | None = None
    ae_title: AETitle = "ORTHANC"
    dicom_host: Text | None = None
    dicom_port: Port = 4242
    calling_ae_title: str = Field(None, validate_default=True)  # type: ignore[assignment]


DestinationConfig = DicomConfig | DicomWebConfig | OrthancConfig
DESTINATION_CONFIGS: dict[str, type[DestinationConfig]] = {
    "orthanc": OrthancConfig,
    "dicom": DicomConfig,
    "dicomweb": DicomWebConfig,
}


def _one_line(exc: ValidationError) -> str:
    """The first problem of a ValidationError as one line naming the key (no pydantic dump)."""
    first = exc.errors(include_url=False)[0]
    key = ".".join(str(part) for part in first["loc"][:1])
    kind = first["type"]
    if kind == "extra_forbidden":
        unknown = sorted(str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden")
        return f"unknown key(s) {unknown}"
    if kind == "missing":
        return f"{key!r} is required"
    if kind == "value_error":
        return f"{key!r} {str(first['msg']).removeprefix('Value error, ')}"
    return f"{key!r} {_EXPECTS.get(key) or 'is invalid (' + str(first['msg']) + ')'}"


def destination_configs(settings: Settings) -> dict[str, DestinationConfig]:
    """Every configured destination's checked configuration by name; nothing is connected.

    The built-in ``orthanc`` comes from the settings (``OPENMSK_ORTHANC_URL`` and its user, password, AE title
    and DICOM port; the node's AE title calls it); an entry of the file with the same name replaces it.
    Raises :class:`DestinationConfigError`.
    """
    context = {"scp_ae_title": settings.scp_ae_title}
    found: dict[str, DestinationConfig] = {}
    if settings.orthanc_url:
        found[ORTHANC] = OrthancConfig.model_validate(
            {
                "url": settings.orthanc_url,
                "user": settings.orthanc_user,
                "password": settings.orthanc_password,
                "ae_title": settings.orthanc_aet,
                "dicom_port": settings.orthanc_dicom_port,
                "calling_ae_title": settings.scp_ae_title,
            },
            context=context,
        )
    if settings.destinations is None:
        return found
    path = Path(settings.destinations)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DestinationConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise DestinationConfigError(f"{path}: not valid TOML ({exc})") from None
    extra = sorted(set(raw) - {"destinations"})
    if extra:
        raise DestinationConfigError(
            f"{path}: unknown top-level key(s) {extra}; destinations go in [destinations.<name>] tables"
        )
    entries = raw.get("destinations", {})
    if not isinstance(entries, dict):
        raise DestinationConfigError(f"{path}: 'destinations' must be a table ([destinations.<name>])")
    for name, options in entries.items():
        if not isinstance(options, dict):
            raise DestinationConfigError(f"{path}: destination {name!r} must be a table")
        kind = options.get("type")
        if kind not in DESTINATION_CONFIGS:
            raise DestinationConfigError(
                f"{path}: destination {name!r}: type must be one of {sorted(DESTINATION_CONFIGS)}, got {kind!r}"
            )
        try:
            found[name] = DESTINATION_CONFIGS[kind].model_validate(options, context=context)
        except ValidationError as exc:
            raise DestinationConfigError(f"{path}: destination {name!r}: {_one_line(exc)}") from None
    return found


def configured_destination_names(settings: Settings) -> set[str]:
    """The names routing rules may use; the file is checked, nothing is connected. Raises
    :class:`DestinationConfigError`."""
    return set(destination_configs(settings))


def load_destinations(settings: Settings) -> dict[str, Destination]:
    """Every configured destination by name; a bad entry is a :class:`DestinationConfigError` (a
    ``ValueError``) naming it."""
    found: dict[str, Destination] = {}
    for name, config in destination_configs(settings).items():
        options = config.model_dump(exclude={"type"})
        found[name] = DESTINATION_TYPES[config.type](name=name, **options)
    return found


def default_archive(settings: Settings) -> list[str]:
    """The archive of a rule without ``archive`` (and of unmatched series): Orthanc when configured."""
    return [ORTHANC] if settings.orthanc_url else []


def check_named(
    names_by_rule: Mapping[str, Sequence[str]], settings: Settings, where: str = "routing rules"
) -> list[str]:
    """One line per destination a rule names that is not configured (empty: all are).

    ``names_by_rule`` maps a rule's name to the destinations it names. The one exception is the built-in
    ``orthanc`` on a node without Orthanc (``OPENMSK_ORTHANC_URL`` unset, as under ``openmsk up`` when Orthanc
    is not installed): the shipped rules name it, and such a node still runs — results stay on the node — so
    that is logged as a warning. Raises :class:`DestinationConfigError` when the destinations file itself is
    unusable.
    """
    configured = configured_destination_names(settings)
    shown = ", ".join(sorted(configured)) or "none"
    problems = []
    for rule, names in names_by_rule.items():
        for name in names:
            if name in configured:
                continue
            if name == ORTHANC and not settings.orthanc_url:
                LOG.warning(
                    "%s: rule %r names destination 'orthanc', but OPENMSK_ORTHANC_URL is unset: "
                    "nothing is sent there (its deliveries fail, the results stay on this node)",
                    where,
                    rule,
                )
                continue
            problems.append(
                f"{where}: rule {rule!r} names destination {name!r}, which is not configured "
                f"(configured: {shown})"
            )
    return problems


def check_routing(rules: RoutingRules, settings: Settings) -> list[str]:
    """The start-up check of the SCP, the worker and ``openmsk route test``: every destination the rules
    name (``destinations`` and ``archive``) is configured. One line per problem (empty: none)."""
    where = f"routing rules {rules.source}" if rules.source else "routing rules"
    return check_named(rules.named_destinations(), settings, where)


__all__ = [
    "DESTINATION_CONFIGS",
    "DESTINATION_TYPES",
    "DeliveryError",
    "Destination",
    "DestinationConfigError",
    "DicomConfig",
    "DicomWebConfig",
    "OrthancConfig",
    "check_named",
    "check_routing",
    "configured_destination_names",
    "default_archive",
    "destination_configs",
    "load_destinations",
]
