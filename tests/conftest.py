"""Real peers for the tests: a redis-server and an Orthanc started on free ports, stopped at the end.

The fixtures use the same ``openmsk.managed`` classes that ``openmsk up`` runs, so the tests exercise them too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from openmsk.config import Settings, load_settings
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.managed.process import free_port
from openmsk.managed.redis import ManagedRedis

ORTHANC_USER = "test"
ORTHANC_PASSWORD = "test-password"


@pytest.fixture(autouse=True)
def _no_ambient_openmsk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own settings: an OPENMSK_* variable of the developer's shell must not leak in."""
    for name in list(os.environ):
        if name.startswith("OPENMSK_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedRedis]:
    with ManagedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: ManagedRedis) -> str:
    """A clean database on the shared test Redis."""
    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedOrthanc]:
    server = ManagedOrthanc(
        data_dir=tmp_path_factory.mktemp("orthanc"),
        http_port=free_port(),
        dicom_port=free_port(),
        user=ORTHANC_USER,
        password=ORTHANC_PASSWORD,
    )
    with server:
        yield server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def settings(data_dir: Path, redis_url: str) -> Settings:
    """Settings for one test: its own DATA_DIR, the test Redis, free ports, no Orthanc unless asked."""
    return load_settings(
        data_dir=data_dir,
        redis_url=redis_url,
        scp_host="127.0.0.1",
        scp_port=free_port(),
        web_port=free_port(),
        worker_stale_s=3.0,
    )


SEAWEEDFS_ACCESS_KEY = "openmsk-test-access"
SEAWEEDFS_SECRET_KEY = "openmsk-test-secret-0123456789"


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory):  # -> Iterator[ManagedSeaweedFS]
    """A real S3 object store (SeaweedFS, authentication on) for the tests of openmsk/objectstore.py."""
    from openmsk.managed.seaweedfs import ManagedSeaweedFS

    server = ManagedSeaweedFS(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key=SEAWEEDFS_ACCESS_KEY,
        secret_key=SEAWEEDFS_SECRET_KEY,
        bucket="openmsk-test",
    )
    with server:
        yield server
