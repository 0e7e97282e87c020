"""``openmsk up``: the whole node on one machine, in the foreground.

Starts a private Redis and a managed Orthanc when none is configured, then the SCP, one worker and the web
server as child processes (``openmsk scp|worker|web``, the same commands a multi-host deployment runs), and the
OHIF viewer's server on its own port (``openmsk viewer``). A child that crashes is restarted; Ctrl-C or
SIGTERM stops every child within 10 s and leaves no process behind.

The banner never prints a secret (under systemd stdout is the journal): for a generated Orthanc password or API
token it names the file under ``DATA_DIR/secrets`` and ``openmsk secrets show``. The start and the stop are
lines of the audit trail (:mod:`openmsk.audit`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from openmsk import __version__, audit
from openmsk.config import MANAGED_STORAGE, Settings, env_name
from openmsk.managed.orthanc import ORTHANC_DIR, ManagedOrthanc, orthanc_binary
from openmsk.managed.process import spawn, stop_all
from openmsk.managed.redis import ManagedRedis
from openmsk.managed.seaweedfs import ManagedSeaweedFS
from openmsk.stored_secrets import (
    API_TOKEN,
    ORTHANC_PASSWORD,
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    ensure_api_token,
    orthanc_credentials,
    secret_path,
    stored_secret,
)

# The viewer serves the OHIF build on its own port: the build expects to live at its origin's root.
SERVICES = ("scp", "worker", "web", "viewer")
NODE_MODALITY = "openmsk"  # the node's name in Orthanc's DicomModalities
RESTART_LIMIT = 5  # crashes of one service within RESTART_WINDOW_S before the node gives up
RESTART_WINDOW_S = 60.0
SHOW = "openmsk secrets show"  # how the banner tells a person to read a generated secret


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    crashes: list[float] = field(default_factory=list)


class Node:
    """The supervisor behind ``openmsk up``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = dict(os.environ)
        self.redis: ManagedRedis | None = None
        self.orthanc: ManagedOrthanc | None = None
        self.objects: ManagedSeaweedFS | None = None
        self.children = [Child(name, [sys.executable, "-m", "openmsk", name]) for name in SERVICES]
        self.stopping = threading.Event()

    def _set(self, field_name: str, value: str) -> None:
        self.env[env_name(field_name)] = value

    def start_backing_services(self) -> list[str]:
        """Start managed Redis/Orthanc where needed; return lines describing them."""
        s, lines = self.settings, []
        data = s.data_path
        if s.redis_url is None:
            self.redis = ManagedRedis(data / "redis").start()
            self._set("redis_url", self.redis.url)
            lines.append(f"  Redis    {self.redis.url}  (managed, AOF under {data / 'redis'})")
        else:
            lines.append(f"  Redis    {s.redis_url}  (external)")

        if s.storage_url == MANAGED_STORAGE:
            lines.append(self._start_object_store())
        elif s.storage_url:
            lines.append(f"  Storage  {s.storage_url}  (external)")

        if s.orthanc_url is not None:
            lines.append(f"  Orthanc  {s.orthanc_url}  (external)")
        elif orthanc_binary() is None:
            lines.append("  Orthanc  not installed and OPENMSK_ORTHANC_URL unset: results stay on this node")
        else:
            user, password, generated = orthanc_credentials(s)
            autoroute = ORTHANC_DIR / "autoroute.lua"
            self.orthanc = ManagedOrthanc(
                data_dir=data / "orthanc",
                http_port=s.orthanc_http_port,
                dicom_port=s.orthanc_dicom_port,
                aet=s.orthanc_aet,
                user=user,
                password=password,
                modalities={NODE_MODALITY: (s.scp_ae_title, "127.0.0.1", s.scp_port)},
                lua_scripts=[autoroute] if autoroute.exists() else [],
            ).start()
            self._set("orthanc_url", self.orthanc.url)
            self._set("orthanc_user", user)
            self._set("orthanc_password", password)
            # Never the password itself: this output is the journal under systemd.
            where = (
                f"password in {secret_path(s, ORTHANC_PASSWORD)} (generated; show it: {SHOW} orthanc-password)"
                if generated
                else "password from OPENMSK_ORTHANC_PASSWORD"
            )
            lines.append(
                f"  Orthanc  {self.orthanc.url}  DICOM {s.orthanc_aet}@{s.orthanc_dicom_port}  "
                f"user {user!r}, {where}"
            )
        return lines

    def _start_object_store(self) -> str:
        """A SeaweedFS S3 store under DATA_DIR/seaweedfs with generated keys, for workers on other hosts."""
        s = self.settings
        access, _ = stored_secret(s, S3_ACCESS_KEY)
        secret, _ = stored_secret(s, S3_SECRET_KEY)
        self.objects = ManagedSeaweedFS(
            s.data_path / "seaweedfs", s.storage_managed_port, access_key=access, secret_key=secret
        ).start()
        self._set("storage_url", self.objects.url)
        self._set("storage_endpoint_url", self.objects.endpoint_url)
        # boto3's own variables: the children's S3 clients read them, no OPENMSK_* setting ever holds a key.
        self.env["AWS_ACCESS_KEY_ID"] = access
        self.env["AWS_SECRET_ACCESS_KEY"] = secret
        return (
            f"  Storage  {self.objects.url} at {self.objects.endpoint_url}  (managed SeaweedFS under "
            f"{self.objects.data_dir}; keys in {secret_path(s, S3_ACCESS_KEY)} and {secret_path(s, S3_SECRET_KEY)}, "
            f"show them: {SHOW} s3-access-key / s3-secret-key)"
        )

    def start_child(self, child: Child) -> None:
        child.proc = spawn(child.argv, env=self.env)

    def run(self) -> int:
        s = self.settings
        s.data_path.mkdir(parents=True, exist_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        log = audit.AuditLog(s.data_path)
        audit.application(log, started=True)
        try:
            lines = self.start_backing_services()
            for child in self.children:
                self.start_child(child)
            self._print_banner(lines)
            return self._supervise()
        finally:
            self.shutdown()
            audit.application(log, started=False)

    def _print_banner(self, lines: list[str]) -> None:
        s = self.settings
        print(f"OpenMSK Node {__version__} — data in {s.data_path}", flush=True)
        for line in lines:
            print(line, flush=True)
        print(f"  SCP      {s.scp_ae_title}@{s.scp_host}:{s.scp_port}", flush=True)
        print(f"  Web      http://{s.web_host}:{s.web_port}  (health: /health)", flush=True)
        if (s.viewer_dist / "index.html").is_file():
            print(f"  Viewer   http://{s.web_host}:{s.viewer_port}  (OHIF; the web's sign-in)", flush=True)
        else:
            print(
                f"  Viewer   port {s.viewer_port}: OHIF not installed ({s.viewer_dist}); "
                "run `npm ci --omit=dev --ignore-scripts` in the checkout",
                flush=True,
            )
        _, generated = ensure_api_token(s)
        if generated:
            print(
                f"  API      token in {secret_path(s, API_TOKEN)} (generated; show it: {SHOW} api-token)",
                flush=True,
            )
        else:
            print("  API      tokens from OPENMSK_API_TOKENS", flush=True)
        print(f"  Worker   1 process, device {s.device}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)

    def _supervise(self) -> int:
        while not self.stopping.wait(0.5):
            for child in self.children:
                if child.proc is None or child.proc.poll() is None:
                    continue
                now = time.monotonic()
                child.crashes = [t for t in child.crashes if now - t < RESTART_WINDOW_S] + [now]
                if len(child.crashes) > RESTART_LIMIT:
                    print(
                        f"openmsk: {child.name} keeps exiting (status {child.proc.returncode}); stopping",
                        flush=True,
                    )
                    return 1
                print(
                    f"openmsk: {child.name} exited with status {child.proc.returncode}; restarting",
                    flush=True,
                )
                self.start_child(child)
        return 0

    def shutdown(self) -> None:
        """Stop the services first (they may still talk to Redis/Orthanc), then Orthanc and Redis."""
        stop_all([c.proc for c in self.children if c.proc is not None], timeout_s=6.0)
        backing = [
            p
            for p in (
                self.orthanc and self.orthanc.proc,
                self.objects and self.objects.proc,
                self.redis and self.redis.proc,
            )
            if p is not None
        ]
        stop_all(backing, timeout_s=3.0)
        print("OpenMSK Node stopped.", flush=True)


def up(settings: Settings) -> int:
    return Node(settings).run()
