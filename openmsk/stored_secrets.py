"""Secrets the node generates for itself when a site sets none, kept under ``DATA_DIR/secrets`` (mode 0600).

One mechanism for all of them — the managed Orthanc's password, the API token, the web's session key — so
every process of a node (``openmsk up``'s children, a container and the host) finds the same value.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from openmsk.atomic import write_atomic
from openmsk.config import Settings

API_TOKEN = "api_token"
ORTHANC_PASSWORD = "orthanc_password"
WEB_SECRET_KEY = "web_secret_key"
S3_ACCESS_KEY = "s3_access_key"  # the managed object store's keys (OPENMSK_STORAGE_URL=managed)
S3_SECRET_KEY = "s3_secret_key"


def secret_path(settings: Settings, name: str) -> Path:
    return settings.data_path / "secrets" / name


def stored_secret(settings: Settings, name: str) -> tuple[str, bool]:
    """The secret ``name``, created (random, mode 0600, exclusively) when missing.

    Returns ``(value, created_now)``. Two processes racing to create it end up reading the same file.
    """
    path = secret_path(settings, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_urlsafe(32)
    try:
        write_atomic(path, value + "\n", mode=0o600, exclusive=True)
    except FileExistsError:
        return path.read_text().strip(), False
    return value, True


def ensure_api_token(settings: Settings) -> tuple[str, bool]:
    """An API token the node accepts: the first of ``OPENMSK_API_TOKENS``, else one generated once and kept.

    Returns ``(token, generated)``; ``generated`` is true when the token comes from the node (now or on an
    earlier start), so ``openmsk up`` knows to print it.
    """
    if settings.api_tokens:
        return settings.api_tokens[0], False
    token, _ = stored_secret(settings, API_TOKEN)
    return token, True


def orthanc_credentials(settings: Settings) -> tuple[str, str, bool]:
    """The managed Orthanc's user and password: from settings, else ``openmsk`` and a password kept here.

    Returns ``(user, password, generated)``.
    """
    user = settings.orthanc_user or "openmsk"
    if settings.orthanc_password:
        return user, settings.orthanc_password, False
    password, _ = stored_secret(settings, ORTHANC_PASSWORD)
    return user, password, True
