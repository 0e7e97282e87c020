"""A managed Orthanc: configuration generated from ``orthanc/`` plus the node's settings, started as a child.

Orthanc 1.10 cannot choose its listening address, so ``RemoteAccessAllowed`` stays false: only local clients
(the node itself) reach its HTTP API; authentication stays on regardless.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import requests

from openmsk.config import REPO_DIR
from openmsk.managed.process import spawn, stop, wait_until

ORTHANC_DIR = REPO_DIR / "orthanc"
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)


def dicomweb_plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        if (folder / DICOMWEB_PLUGIN).exists():
            return folder / DICOMWEB_PLUGIN
    return None


@dataclass
class ManagedOrthanc:
    """One Orthanc process with storage under ``data_dir``.

    ``modalities`` maps a symbolic name to ``(AE title, host, port)`` — the node registers its SCP here so that
    Orthanc can push to it; ``lua_scripts`` are loaded at start (auto-routing).
    """

    data_dir: Path
    http_port: int
    dicom_port: int
    user: str
    password: str
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    lua_scripts: list[Path] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def configuration(self) -> dict[str, object]:
        """The full Orthanc configuration: the shipped ``orthanc/orthanc.json`` plus this node's values."""
        config = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
        storage = self.data_dir / "storage"
        config.update(
            {
                "StorageDirectory": str(storage),
                "IndexDirectory": str(storage),
                "HttpPort": self.http_port,
                "DicomPort": self.dicom_port,
                "DicomAet": self.aet,
                "RegisteredUsers": {self.user: self.password},
                "DicomModalities": {name: list(m) for name, m in self.modalities.items()},
                "LuaScripts": [str(p) for p in self.lua_scripts],
                "Plugins": [str(p) for p in [dicomweb_plugin()] if p is not None],
            }
        )
        config.update(self.extra)
        return config

    def start(self, timeout_s: float = 30.0) -> ManagedOrthanc:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError(
                "Orthanc is not installed (Debian package orthanc); or set OPENMSK_ORTHANC_URL"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.data_dir / "orthanc.json"
        config_path.write_text(json.dumps(self.configuration(), indent=2))
        config_path.chmod(0o600)  # it holds the password
        # Without TCP_NODELAY every DICOM instance Orthanc sends or receives stalls ~40 ms (Nagle + delayed ACK).
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = spawn([binary, str(config_path)], env=env, log=self.data_dir / "orthanc.log")
        wait_until(self.ready, timeout_s, f"Orthanc on port {self.http_port}", self.proc)
        return self

    def ready(self) -> bool:
        response = requests.get(f"{self.url}/system", auth=(self.user, self.password), timeout=1)
        return response.status_code == 200

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def __enter__(self) -> ManagedOrthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
