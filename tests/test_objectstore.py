"""The storage layer (openmsk/objectstore.py) against a real S3 store: SeaweedFS with authentication on."""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from pathlib import Path

import pytest
import requests
from boto3.s3.transfer import TransferConfig

from openmsk.config import ConfigError, load_settings
from openmsk.managed.seaweedfs import ManagedSeaweedFS
from openmsk.objectstore import (
    SHA256_KEY,
    FetchCache,
    LocalStore,
    ObjectMissing,
    S3Store,
    StorageAccessDenied,
    StorageError,
    StorageUnavailable,
    check_rel,
    parse_s3_url,
    store_for,
)
from tests.conftest import SEAWEEDFS_ACCESS_KEY, SEAWEEDFS_SECRET_KEY


def _aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, access: str | None, secret: str | None) -> None:
    """Credentials exactly as given, and nothing boto3 could pick up from the developer's machine."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in (("AWS_ACCESS_KEY_ID", access), ("AWS_SECRET_ACCESS_KEY", secret)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _aws_env(monkeypatch, tmp_path, SEAWEEDFS_ACCESS_KEY, SEAWEEDFS_SECRET_KEY)


@pytest.fixture
def store(seaweedfs_server: ManagedSeaweedFS, aws_env: None) -> S3Store:
    """The test bucket under a key prefix of this test's own."""
    return S3Store(
        f"{seaweedfs_server.url}/t-{uuid.uuid4().hex[:12]}", endpoint_url=seaweedfs_server.endpoint_url
    )


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# --- S3Store against SeaweedFS ---


def test_put_fetch_round_trip_is_byte_identical_with_its_checksum(
    store: S3Store, seaweedfs_server: ManagedSeaweedFS, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    source = _file(tmp_path / "src" / "1.dcm", data)
    rel = "incoming/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    store.put_file(rel, source)
    head = seaweedfs_server.client().head_object(Bucket=store.bucket, Key=store.prefix + rel)
    assert head["Metadata"][SHA256_KEY] == hashlib.sha256(data).hexdigest()
    assert store.exists(rel)

    target = tmp_path / "dst" / "incoming" / "1.dcm"
    store.fetch(rel, target)
    assert target.read_bytes() == data
    assert _leftovers(target.parent) == []


def test_multipart_upload_keeps_the_checksum(store: S3Store, tmp_path: Path) -> None:
    store._transfer = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)  # three parts
    store.put_file("uploads/u1/volume.nii.gz", _file(tmp_path / "v.nii.gz", data))
    store.fetch("uploads/u1/volume.nii.gz", tmp_path / "out.nii.gz")
    assert (tmp_path / "out.nii.gz").read_bytes() == data


def test_corrupted_object_is_refused_and_the_local_file_left_alone(
    store: S3Store, seaweedfs_server: ManagedSeaweedFS, tmp_path: Path
) -> None:
    rel = "jobs/j1/output/seg.dcm"
    store.put_file(rel, _file(tmp_path / "seg.dcm", b"the real segmentation" * 100))
    key = store.prefix + rel
    client = seaweedfs_server.client()
    metadata = client.head_object(Bucket=store.bucket, Key=key)["Metadata"]
    # Same size, other bytes, the old metadata: what a bit flip or a foreign overwrite looks like.
    client.put_object(Bucket=store.bucket, Key=key, Body=b"the fake segmentation" * 100, Metadata=metadata)

    target = _file(tmp_path / "dst" / "seg.dcm", b"previous content")
    with pytest.raises(ObjectMissing) as info:
        store.fetch(rel, target)
    message = str(info.value)
    assert "checksum mismatch" in message and rel in message and metadata[SHA256_KEY] in message
    assert "\n" not in message
    assert target.read_bytes() == b"previous content"
    assert _leftovers(target.parent) == []


def test_missing_object_and_object_without_checksum(
    store: S3Store, seaweedfs_server: ManagedSeaweedFS, tmp_path: Path
) -> None:
    with pytest.raises(ObjectMissing, match=re.escape("fetching incoming/a/b/none.dcm: not found")):
        store.fetch("incoming/a/b/none.dcm", tmp_path / "none.dcm")
    assert not (tmp_path / "none.dcm").exists()
    assert not store.exists("incoming/a/b/none.dcm")

    seaweedfs_server.client().put_object(Bucket=store.bucket, Key=store.prefix + "foreign.dcm", Body=b"x")
    with pytest.raises(ObjectMissing, match="no sha256 metadata"):
        store.fetch("foreign.dcm", tmp_path / "foreign.dcm")


def test_wrong_credentials_are_a_clear_error_without_the_secret(
    seaweedfs_server: ManagedSeaweedFS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _aws_env(monkeypatch, tmp_path, SEAWEEDFS_ACCESS_KEY, "not-the-secret-key")
    store = S3Store(seaweedfs_server.url, endpoint_url=seaweedfs_server.endpoint_url)
    with pytest.raises(StorageAccessDenied) as info:
        store.put_file("x/y.dcm", _file(tmp_path / "y.dcm", b"y"))
    message = str(info.value)
    assert "refused" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "not-the-secret-key" not in message and seaweedfs_server.endpoint_url in message
    with pytest.raises(StorageAccessDenied):
        store.fetch("x/y.dcm", tmp_path / "z.dcm")


def test_no_credentials_at_all(
    seaweedfs_server: ManagedSeaweedFS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _aws_env(monkeypatch, tmp_path, None, None)
    store = S3Store(seaweedfs_server.url, endpoint_url=seaweedfs_server.endpoint_url)
    with pytest.raises(StorageAccessDenied, match=r"no S3 credentials.*AWS_ACCESS_KEY_ID"):
        store.exists("x")


def test_store_stopped_is_unavailable_quickly(aws_env: None, tmp_path: Path) -> None:
    server = ManagedSeaweedFS(
        tmp_path / "sw",
        access_key=SEAWEEDFS_ACCESS_KEY,
        secret_key=SEAWEEDFS_SECRET_KEY,
        bucket="openmsk-down",
    )
    with server:
        store = S3Store(server.url, endpoint_url=server.endpoint_url)
        store.put_file("a/b.dcm", _file(tmp_path / "b.dcm", b"b"))
        server.stop(timeout_s=1)
    for attempt in (
        lambda: store.fetch("a/b.dcm", tmp_path / "out.dcm"),
        lambda: store.exists("a/b.dcm"),
        lambda: store.put_file("a/c.dcm", tmp_path / "b.dcm"),
        lambda: store.list("a"),
    ):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="unreachable"):
            attempt()
        assert time.monotonic() - started < 10
    assert not (tmp_path / "out.dcm").exists()


def test_bucket_is_created_on_first_use(
    seaweedfs_server: ManagedSeaweedFS, aws_env: None, tmp_path: Path
) -> None:
    bucket = f"openmsk-new-{uuid.uuid4().hex[:8]}"
    client = seaweedfs_server.client()
    assert bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]
    store = S3Store(f"s3://{bucket}/site", endpoint_url=seaweedfs_server.endpoint_url)
    store.check()
    assert bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]
    store.put_file("a.dcm", _file(tmp_path / "a.dcm", b"a"))
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["site/a.dcm"]
    client.delete_object(Bucket=bucket, Key="site/a.dcm")
    client.delete_bucket(Bucket=bucket)


def test_list_and_delete_prefix_are_by_folder(store: S3Store, tmp_path: Path) -> None:
    source = _file(tmp_path / "f", b"f")
    for rel in ("jobs/1/a.dcm", "jobs/1/sub/b.dcm", "jobs/10/c.dcm", "uploads/u/d.nii"):
        store.put_file(rel, source)
    assert store.list("jobs/1") == ["jobs/1/a.dcm", "jobs/1/sub/b.dcm"]
    assert store.list("jobs/1/") == store.list("jobs/1")
    assert store.list("") == ["jobs/1/a.dcm", "jobs/1/sub/b.dcm", "jobs/10/c.dcm", "uploads/u/d.nii"]
    assert store.delete_prefix("jobs/1") == 2
    assert store.list("jobs") == ["jobs/10/c.dcm"]
    assert store.delete_prefix("jobs/nothing") == 0
    with pytest.raises(ValueError):
        store.delete_prefix("")


def test_fetch_tree_skips_intact_files_only(store: S3Store, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = {"1.dcm": b"one" * 50, "2.dcm": b"two" * 50, "sub/3.dcm": b"three" * 50}
    for name, data in files.items():
        _file(source / name, data)
    rel = "incoming/st/se"
    assert store.put_tree(rel, source) == [f"{rel}/1.dcm", f"{rel}/2.dcm", f"{rel}/sub/3.dcm"]

    local = tmp_path / "data" / rel
    first = store.fetch_tree(rel, local)
    assert (len(first.fetched), first.skipped) == (3, [])
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*.dcm")} == files

    again = store.fetch_tree(rel, local)
    assert (again.fetched, len(again.skipped)) == ([], 3)

    (local / "1.dcm").write_bytes(b"ONE" * 50)  # same size, other content
    (local / "sub" / "3.dcm").unlink()
    (local / "2.dcm").write_bytes(b"two")  # other size
    repaired = store.fetch_tree(rel, local)
    assert repaired.fetched == [f"{rel}/1.dcm", f"{rel}/2.dcm", f"{rel}/sub/3.dcm"]
    assert (local / "1.dcm").read_bytes() == files["1.dcm"] and (local / "2.dcm").read_bytes() == files[
        "2.dcm"
    ]

    with pytest.raises(ObjectMissing, match="no objects under incoming/st/other/"):
        store.fetch_tree("incoming/st/other", tmp_path / "other")


def test_describe_names_the_store_and_no_secret(seaweedfs_server: ManagedSeaweedFS, aws_env: None) -> None:
    store = S3Store("s3://openmsk-test/site-a", endpoint_url="https://user:hunter2@s3.example.org:8333")
    text = store.describe()
    assert "s3://openmsk-test/site-a/" in text and "s3.example.org:8333" in text
    assert "hunter2" not in text and SEAWEEDFS_SECRET_KEY not in text and SEAWEEDFS_ACCESS_KEY not in text


def test_managed_seaweedfs_requires_authentication_and_binds_loopback(
    seaweedfs_server: ManagedSeaweedFS,
) -> None:
    assert requests.get(f"{seaweedfs_server.endpoint_url}/openmsk-test", timeout=5).status_code == 403
    argv = seaweedfs_server.argv("weed")
    assert "-ip.bind=127.0.0.1" in argv
    ports = [
        seaweedfs_server.master_port,
        seaweedfs_server.master_grpc_port,
        seaweedfs_server.volume_port,
        seaweedfs_server.volume_grpc_port,
        seaweedfs_server.filer_port,
        seaweedfs_server.filer_grpc_port,
        seaweedfs_server.s3_port,
        seaweedfs_server.s3_grpc_port,
    ]
    assert len(set(ports)) == 8
    for port in ports:  # every gRPC port is explicit: none left to SeaweedFS's port+10000
        assert any(arg.endswith(f"={port}") for arg in argv)


# --- FetchCache ---


def _series(store: S3Store, tmp_path: Path, rel: str, size: int) -> None:
    store.put_file(f"{rel}/1.dcm", _file(tmp_path / "series" / rel / "1.dcm", os.urandom(size)))


def test_fetch_cache_evicts_least_recently_used_by_size(store: S3Store, tmp_path: Path) -> None:
    a, b, c = "incoming/st/a", "incoming/st/b", "uploads/c"
    for rel in (a, b, c):
        _series(store, tmp_path, rel, 1000)
    store.put_file("jobs/j/input.json", _file(tmp_path / "input.json", os.urandom(5000)))
    data = tmp_path / "worker-data"
    cache = FetchCache(store, data, limit_bytes=2500)

    assert cache.ensure([a]) == data
    assert (data / a / "1.dcm").stat().st_size == 1000
    cache.ensure([b, "jobs/j/input.json"])  # a job file: fetched, never counted or evicted
    cache.ensure([c])
    assert not (data / a).exists() and (data / b).is_dir() and (data / c).is_dir()
    assert (data / "jobs/j/input.json").is_file()

    cache.ensure([b])  # b is now more recent than c
    cache.ensure([a])
    assert (data / a).is_dir() and (data / b).is_dir() and not (data / c).exists()
    assert sum(size for _, size, _ in cache.entries()) <= 2500

    # An entry in use stays even when it alone exceeds the limit; the others go.
    small = FetchCache(store, data, limit_bytes=500)
    small.ensure([a])
    assert [entry for _, _, entry in small.entries()] == [a]
    assert (data / "incoming").is_dir() and (data / "uploads").is_dir()

    # A whole study at once: every series of it is in use, none is evicted by the call that fetched it.
    small.ensure(["incoming/st"])
    assert [entry for _, _, entry in small.entries()] == [a, b]


def test_fetch_cache_repairs_a_damaged_cached_file(store: S3Store, tmp_path: Path) -> None:
    _series(store, tmp_path, "incoming/st/s", 800)
    data = tmp_path / "worker-data"
    cache = FetchCache(store, data, limit_bytes=10_000)
    cache.ensure(["incoming/st/s"])
    good = (data / "incoming/st/s/1.dcm").read_bytes()
    (data / "incoming/st/s/1.dcm").write_bytes(b"\0" * 800)
    cache.ensure(["incoming/st/s"])
    assert (data / "incoming/st/s/1.dcm").read_bytes() == good
    with pytest.raises(ObjectMissing):
        cache.ensure(["incoming/st/missing"])


def test_fetch_cache_on_a_local_store_never_deletes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _file(data / "incoming/st/a/1.dcm", b"x" * 1000)
    _file(data / "incoming/st/b/1.dcm", b"x" * 1000)
    cache = FetchCache(LocalStore(data), data, limit_bytes=1)
    assert cache.ensure(["incoming/st/a"]) == data
    cache.ensure(["incoming/st/b"])
    assert (data / "incoming/st/a/1.dcm").is_file() and (data / "incoming/st/b/1.dcm").is_file()
    with pytest.raises(ObjectMissing):
        cache.ensure(["incoming/st/c"])


# --- LocalStore ---


def test_local_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = LocalStore(data)
    rel = "incoming/st/se/1.dcm"
    source = _file(data / rel, b"instance")
    _file(data / "incoming/st/se/.2.dcm.123.456.tmp", b"half")  # an atomic write in progress
    _file(data / "incoming/st/se10/3.dcm", b"other series")

    store.put_file(rel, source)  # already there: nothing to do
    assert source.read_bytes() == b"instance"
    store.fetch(rel, data / rel)
    assert store.exists(rel) and not store.exists("incoming/st/se/2.dcm")
    assert store.list("incoming/st/se") == [rel]
    assert store.list("") == [rel, "incoming/st/se10/3.dcm"]

    store.fetch(rel, tmp_path / "copy" / "1.dcm")
    assert (tmp_path / "copy" / "1.dcm").read_bytes() == b"instance"
    store.put_file("uploads/u/x.nii", tmp_path / "copy" / "1.dcm")  # from elsewhere: copied into DATA_DIR
    assert (data / "uploads/u/x.nii").read_bytes() == b"instance"
    with pytest.raises(ObjectMissing, match=re.escape("incoming/st/se/2.dcm is not in local DATA_DIR")):
        store.fetch("incoming/st/se/2.dcm", tmp_path / "2.dcm")

    assert store.fetch_tree("incoming/st/se", data / "incoming/st/se").skipped == [rel]
    copied = store.fetch_tree("incoming/st", tmp_path / "tree")
    assert copied.fetched == [rel, "incoming/st/se10/3.dcm"]
    assert (tmp_path / "tree/se10/3.dcm").read_bytes() == b"other series"
    assert store.fetch_tree("incoming/st", tmp_path / "tree").skipped == copied.fetched

    assert store.delete_prefix("incoming/st/se") == 1
    assert not (data / "incoming/st/se").exists() and store.list("incoming") == ["incoming/st/se10/3.dcm"]
    with pytest.raises(ValueError):
        store.delete_prefix("")
    store.check()
    assert str(data) in store.describe()


@pytest.mark.parametrize("rel", ["", "/etc/passwd", "../x", "a/../b", "a//b", "a\\b", "./a"])
def test_paths_must_be_clean_and_relative(rel: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        check_rel(rel)
    with pytest.raises(ValueError):
        LocalStore(tmp_path).exists(rel)


# --- store_for and the settings ---


def test_store_for_picks_the_store_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aws_env: None
) -> None:
    local = store_for(load_settings(data_dir=tmp_path))
    assert isinstance(local, LocalStore) and local.data_dir == tmp_path.resolve()

    monkeypatch.setenv("OPENMSK_STORAGE_URL", "s3://openmsk-site/node-a/")
    monkeypatch.setenv("OPENMSK_STORAGE_ENDPOINT_URL", "http://127.0.0.1:9/")
    remote = store_for(load_settings(data_dir=tmp_path))
    assert isinstance(remote, S3Store)
    assert (remote.bucket, remote.prefix, remote.endpoint_url) == (
        "openmsk-site",
        "node-a/",
        "http://127.0.0.1:9",
    )
    assert load_settings().storage_cache_mb == 20480


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("s3://B_ad", "store_for"),
        ("s3://ab", "store_for"),
        ("s3://bucket/../x", "store_for"),
        ("s3://key:secret@bucket", "store_for"),
        ("http://bucket", "settings"),
        ("bucket/prefix", "settings"),
    ],
)
def test_bad_storage_url_is_one_config_line(url: str, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENMSK_STORAGE_URL", url)
    with pytest.raises(ConfigError) as info:
        store_for(load_settings())
    message = str(info.value)
    shown = url.replace("key:secret@", "***@")
    assert message.startswith(f"OPENMSK_STORAGE_URL={shown!r} is invalid") and "secret" not in message
    assert "\n" not in message and "s3://bucket[/prefix]" in message
    if where == "store_for":
        with pytest.raises(ValueError):
            parse_s3_url(url)


def test_bad_endpoint_url_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENMSK_STORAGE_ENDPOINT_URL", "127.0.0.1:8333")
    with pytest.raises(
        ConfigError, match=re.escape("OPENMSK_STORAGE_ENDPOINT_URL='127.0.0.1:8333' is invalid")
    ):
        load_settings()


def test_storage_errors_share_one_base() -> None:
    for error in (ObjectMissing, StorageUnavailable, StorageAccessDenied):
        assert issubclass(error, StorageError)
