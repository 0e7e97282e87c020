"""A private redis-server on 127.0.0.1 with AOF persistence, for a single-host node and for the tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import redis

from openmsk.managed.process import free_port, spawn, stop, wait_until


class ManagedRedis:
    """``redis-server`` bound to 127.0.0.1 on a free port, data (AOF) under ``data_dir``."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> ManagedRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (Debian package redis-server); or set OPENMSK_REDIS_URL"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        self.proc = spawn(argv, log=self.data_dir / "redis.log")
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        wait_until(client.ping, timeout_s, f"redis-server on port {self.port}", self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def __enter__(self) -> ManagedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
