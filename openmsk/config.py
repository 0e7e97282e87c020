"""The node's settings: one object, read from ``OPENMSK_*`` environment variables and an optional ``.env``.

Every service (SCP, worker, web, ``openmsk up``) reads the same :class:`Settings`, so a value can never mean one
thing in one room and another thing in the next. A bad value stops start-up with :class:`ConfigError`, whose
message is one line naming the variable and what it expects.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "OPENMSK_"
MANAGED_STORAGE = "managed"  # OPENMSK_STORAGE_URL value: `openmsk up` starts the object store itself
#: DATA_DIR/incoming/<study>/<series>/: what the SCP received; retention removes old series from it.
INCOMING = "incoming"

REPO_DIR = Path(__file__).resolve().parents[1]

# DICOM PS3.5 AE title: 1-16 characters of the default repertoire, no backslash, not only spaces.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class ConfigError(Exception):
    """A setting has a bad value; ``str()`` is one line naming the variable."""


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


Port = Annotated[int, Field(ge=1, le=65535)]
CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Configuration of one node. Field descriptions double as the README table and the error hints."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(
        Path("./data"), description="a directory for received DICOM, jobs, results, Redis and Orthanc data"
    )
    redis_url: str | None = Field(
        None, description="a redis:// URL; unset: `openmsk up` starts a private redis-server on 127.0.0.1"
    )
    orthanc_url: str | None = Field(
        None,
        description="an http(s):// URL of Orthanc's REST API; unset: `openmsk up` starts a managed Orthanc",
    )
    orthanc_user: str | None = Field(
        None, description="the Orthanc user name; unset: generated, stored under DATA_DIR and printed"
    )
    orthanc_password: str | None = Field(
        None, description="the Orthanc password; unset: generated, stored under DATA_DIR and printed"
    )
    orthanc_http_port: Port = Field(
        8042, description="a TCP port (1-65535) for the managed Orthanc's HTTP API"
    )
    orthanc_dicom_port: Port = Field(
        4242,
        description="a TCP port (1-65535): Orthanc's DICOM port (the managed one listens there; the SCP "
        "archives received images there)",
    )
    orthanc_aet: str = Field(
        "ORTHANC",
        description="Orthanc's AE title (1-16 characters): the managed one's; series from it are not archived back",
    )
    scp_ae_title: str = Field("OPENMSK", description="the node's AE title (1-16 characters, no backslash)")
    scp_host: str = Field("0.0.0.0", description="the address the DICOM SCP listens on")
    scp_port: Port = Field(11112, description="a TCP port (1-65535) for the DICOM SCP")
    web_host: str = Field(
        "127.0.0.1",
        description="the address the web server listens on (a reverse proxy fronts it in production)",
    )
    web_port: Port = Field(8000, description="a TCP port (1-65535) for the web server")
    # --- SCP ---
    scp_allowed_calling_aes: str = Field(
        "",
        description="comma-separated calling AE titles allowed to associate, each optionally bound to "
        "addresses as AE@IP or AE@CIDR (repeat an AE for more addresses); empty: any calling AE",
    )
    scp_max_associations: int = Field(
        10,
        ge=1,
        description="associations (>= 1) the SCP serves at once, all receiver processes together; more are "
        "rejected as local-limit-exceeded",
    )
    scp_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="receiver processes (1-64) sharing the SCP port (SO_REUSEPORT); 1: the SCP receives in "
        "its own process",
    )
    scp_tls_cert: Path | None = Field(
        None, description="a PEM certificate file; with OPENMSK_SCP_TLS_KEY the SCP accepts DICOM TLS only"
    )
    scp_tls_key: Path | None = Field(None, description="the PEM private key file of OPENMSK_SCP_TLS_CERT")
    scp_tls_ca: Path | None = Field(
        None, description="a PEM file of CA certificates that TLS client certificates must chain to"
    )
    scp_tls_require_client_cert: bool = Field(
        False,
        description="true or false: with TLS, reject clients without a certificate from OPENMSK_SCP_TLS_CA",
    )
    scp_network_timeout_s: float = Field(
        60.0,
        gt=0,
        description="seconds (> 0) the SCP waits on a silent peer before it aborts the association",
    )
    series_quiet_s: float = Field(
        2.0,
        gt=0,
        description="seconds (> 0) with no new instance, after the sending association was released, "
        "before a series counts as complete",
    )
    series_timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds (> 0, >= OPENMSK_SERIES_QUIET_S) with no new instance before a series counts as "
        "complete even while associations stay open",
    )
    routing_rules: Path = Field(
        REPO_DIR / "scp" / "routing.toml",
        description="a TOML file of routing rules: which series go to which models and destinations",
    )
    api_tokens: CsvList = Field(
        default_factory=list, description="comma-separated bearer tokens accepted by the HTTP API"
    )
    available_models: CsvList | None = Field(
        None, description="comma-separated model names to offer; unset: every installed model"
    )
    model_registry: Path = Field(
        REPO_DIR / "models" / "registry.toml",
        description="the TOML file that lists the installed segmentation models",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="one of auto, cpu, cuda: where inference runs (auto: CUDA when present)"
    )
    worker_stale_s: float = Field(
        30.0, gt=0, description="seconds (> 0) after which a worker without a heartbeat counts as gone"
    )
    min_free_disk_mb: int = Field(
        1024,
        ge=0,
        description="megabytes (>= 0) of free space under DATA_DIR below which the node is degraded",
    )
    destinations: Path | None = Field(
        None,
        description="a TOML file of result destinations (DICOM AEs, DICOMweb); `orthanc` is always defined",
    )
    job_time_limit_s: int = Field(1800, gt=0, description="seconds (> 0) a job may run before it is stopped")
    # --- storage ---
    storage_url: str | None = Field(
        None,
        description="an s3://bucket[/prefix] URL of an S3 object store for received DICOM, uploads and job "
        "outputs (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); 'managed': `openmsk up` runs one "
        "(SeaweedFS, keys generated) for workers on other hosts; unset: DATA_DIR only (single host)",
    )
    storage_managed_port: int = Field(
        8333,
        gt=0,
        lt=65536,
        description="S3 port of the object store `openmsk up` manages (storage_url=managed)",
    )
    storage_endpoint_url: str | None = Field(
        None,
        description="an http(s):// URL of the S3 endpoint (SeaweedFS, MinIO; CA bundle from AWS_CA_BUNDLE); "
        "unset: AWS S3",
    )
    storage_cache_mb: int = Field(
        20480,
        gt=0,
        description="megabytes (> 0) of fetched inputs (incoming/, uploads/) a worker keeps under its DATA_DIR "
        "with OPENMSK_STORAGE_URL; the least recently used are removed beyond it",
    )
    # --- web ---
    max_upload_mb: int = Field(
        600, gt=0, description="megabytes (> 0) one upload may hold; a larger one is cut off with HTTP 413"
    )
    max_unzipped_mb: int = Field(
        4096, gt=0, description="megabytes (> 0) an uploaded zip may expand to (zip-bomb cap)"
    )
    retention_hours: float = Field(
        72,
        gt=0,
        description="hours (> 0) uploads and job outputs are kept after their job ends; received series after "
        "their last instance and jobs",
    )
    upload_rate_limit: int = Field(
        10, gt=0, description="uploads (> 0) one client may start per minute; more get HTTP 429"
    )
    web_users: str = Field(
        "",
        description="comma-separated user:password-hash pairs for the web pages "
        "(hash from `openmsk web --hash-password`); empty: sign in with an API token",
    )
    secret_key: str | None = Field(
        None,
        description="a long random string that signs web sessions; unset: generated under DATA_DIR/secrets",
    )
    web_secure_cookies: bool = Field(
        False, description="true or false: mark the session cookie Secure (set it when HTTPS fronts the web)"
    )
    # --- viewer ---
    viewer_port: Port = Field(
        3000,
        description="a TCP port (1-65535) for the OHIF viewer (its own origin: the viewer lives at the root); "
        "it listens on OPENMSK_WEB_HOST",
    )
    viewer_url: str | None = Field(
        None,
        description="the viewer's public http(s):// base URL for links (e.g. https://node.example.org:8443); "
        "unset: the host the web page was opened on, with OPENMSK_VIEWER_PORT",
    )
    viewer_dist: Path = Field(
        REPO_DIR / "node_modules" / "@ohif" / "app" / "dist",
        description="a folder holding a built OHIF viewer (index.html, bundles); "
        "default: node_modules/@ohif/app/dist in the checkout",
    )

    @field_validator("viewer_url")
    @classmethod
    def _viewer_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("not an http URL")
        return value.rstrip("/") if value else None

    @field_validator("api_tokens", "available_models", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("scp_ae_title", "orthanc_aet")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not _AE_TITLE.match(value) or not value.strip():
            raise ValueError("not a DICOM AE title")
        return value.strip()

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("not a redis URL")
        return value or None

    @field_validator("orthanc_url")
    @classmethod
    def _orthanc_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("not an http URL")
        return value.rstrip("/") if value else None

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value and value != MANAGED_STORAGE and not value.startswith("s3://"):
            raise ValueError("not an s3 URL (or 'managed')")
        return value or None

    @field_validator("storage_endpoint_url")
    @classmethod
    def _storage_endpoint_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("not an http URL")
        return value.rstrip("/") if value else None

    @property
    def data_path(self) -> Path:
        """``data_dir`` made absolute, so relative job paths resolve the same in every process."""
        return self.data_dir.expanduser().resolve()


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(**overrides: object) -> Settings:
    """Read the settings; raise :class:`ConfigError` with one line per bad variable (the first is reported)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        info = Settings.model_fields.get(field)
        expects = info.description if info and info.description else first["msg"]
        got = first.get("input")
        raise ConfigError(f"{env_name(field)}={got!r} is invalid: expected {expects}") from None
