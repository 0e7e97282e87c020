"""Who may send to the SCP, over what, and whether there is room: allowlist, TLS and the disk guard.

Everything here is built from settings once, at start-up (a bad value is a :class:`ConfigError` naming the
variable), and then only answers questions on the hot path.
"""

from __future__ import annotations

import ipaddress
import shutil
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from openmsk.config import ConfigError, Settings, env_name

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 §9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling-AE-title-not-recognized
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service-user, called-AE-title-not-recognized
REJECT_NO_SPACE = (0x02, 0x03, 0x01)  # transient, service-provider (presentation), temporary-congestion
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local-limit-exceeded


@dataclass(frozen=True)
class AllowList:
    """Calling AE titles that may associate; each maps to the networks it may come from (empty: anywhere).

    An empty allowlist lets every calling AE in (the called AE title is still checked).
    """

    entries: dict[str, tuple[IPNetwork, ...]]

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def permits(self, calling_ae: str, address: str) -> bool:
        if not self.entries:
            return True
        networks = self.entries.get(calling_ae.strip())
        if networks is None:
            return False
        if not networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in networks)


def parse_allowlist(text: str) -> AllowList:
    """Parse ``OPENMSK_SCP_ALLOWED_CALLING_AES``: ``AE``, ``AE@IP`` or ``AE@CIDR``, comma-separated.

    ``A,B@10.0.0.5,B@10.0.1.0/24`` lets A in from anywhere and B from the two given places.
    """
    entries: dict[str, list[IPNetwork]] = {}
    anywhere: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        ae, _, where = item.partition("@")
        ae = ae.strip()
        if not ae or len(ae) > 16 or "\\" in ae or not ae.isprintable():
            raise _allowlist_error(text, f"{ae!r} is not an AE title")
        entries.setdefault(ae, [])
        if not where:
            anywhere.add(ae)
            continue
        try:
            entries[ae].append(ipaddress.ip_network(where.strip(), strict=False))
        except ValueError:
            raise _allowlist_error(text, f"{where!r} is not an IP address or network") from None
    return AllowList({ae: () if ae in anywhere else tuple(nets) for ae, nets in entries.items()})


def _allowlist_error(text: str, why: str) -> ConfigError:
    field = "scp_allowed_calling_aes"
    expects = Settings.model_fields[field].description
    return ConfigError(f"{env_name(field)}={text!r} is invalid ({why}): expected {expects}")


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server-side TLS context from settings, or None when TLS is off (no certificate configured)."""
    cert, key, ca = settings.scp_tls_cert, settings.scp_tls_key, settings.scp_tls_ca
    if cert is None and key is None:
        if settings.scp_tls_require_client_cert:
            raise ConfigError(
                f"{env_name('scp_tls_require_client_cert')}=true needs {env_name('scp_tls_cert')} and "
                f"{env_name('scp_tls_key')}"
            )
        return None
    if cert is None or key is None:
        missing = "scp_tls_cert" if cert is None else "scp_tls_key"
        raise ConfigError(f"{env_name(missing)} is unset: TLS needs both a certificate and its key")
    if settings.scp_tls_require_client_cert and ca is None:
        raise ConfigError(
            f"{env_name('scp_tls_require_client_cert')}=true needs {env_name('scp_tls_ca')} "
            "to check client certificates against"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
        if ca is not None:
            context.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{env_name('scp_tls_cert')}/{env_name('scp_tls_key')} cannot be loaded: {exc}"
        ) from None
    if settings.scp_tls_require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class DiskGuard:
    """Is there room under ``DATA_DIR``? Answers from a free-space reading at most ``ttl_s`` old."""

    def __init__(self, path: Path, min_free_mb: int, ttl_s: float = 1.0) -> None:
        self.path = path
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.ttl_s = ttl_s
        self._free = 0
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def free_bytes(self) -> int:
        now = time.monotonic()
        with self._lock:
            if now - self._read_at >= self.ttl_s:
                self._free = shutil.disk_usage(self.path).free
                self._read_at = now
            return self._free

    def has_room(self) -> bool:
        return self.free_bytes() >= self.min_free_bytes
