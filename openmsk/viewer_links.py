"""Links into the node's viewer: the one rule for the URL that opens a study, shared by the web pages, the
viewer's redirect (``web.viewer``) and ``openmsk orthanc`` (:mod:`openmsk.orthanc_query`)."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from openmsk.config import Settings


def viewer_base(settings: Settings, host: str | None = None, scheme: str = "http") -> str:
    """The viewer's base URL for links: ``OPENMSK_VIEWER_URL``, else ``host`` (a page's host name; the web
    server's address when not given) with ``OPENMSK_VIEWER_PORT``."""
    if settings.viewer_url:
        return settings.viewer_url
    name = urlsplit(f"//{host}").hostname if host else None
    if not name:
        name = settings.web_host if settings.web_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in name:
        name = f"[{name}]"  # an IPv6 literal
    return f"{scheme}://{name}:{settings.viewer_port}"


def study_link(settings: Settings, study_uid: str, host: str | None = None, scheme: str = "http") -> str:
    """The viewer URL that opens one study."""
    return f"{viewer_base(settings, host, scheme)}/viewer?StudyInstanceUIDs={quote(study_uid, safe='.')}"
