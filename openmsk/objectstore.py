"""The one storage interface of the rooms: files named by their path relative to DATA_DIR.

A single host keeps everything under DATA_DIR (:class:`LocalStore`: uploads and fetches are no-ops, the disk is
the store). With ``OPENMSK_STORAGE_URL=s3://bucket[/prefix]`` (:class:`S3Store`) the same relative paths —
``incoming/<study>/<series>/<sop>.dcm``, ``uploads/<id>/...``, ``jobs/<id>/output/seg.dcm`` — are also objects
in an S3 store (AWS, SeaweedFS, MinIO), so a GPU worker that shares no disk with the node fetches a job's inputs
and uploads its outputs there. :class:`FetchCache` keeps a worker's fetched inputs under its own DATA_DIR within a
size limit.

Integrity: :meth:`ObjectStore.put_file` records the SHA-256 of the content as object metadata (``sha256``) and
:meth:`ObjectStore.fetch` verifies it while it streams the object into a temporary file beside the target, then
``fsync``s and renames it into place (:func:`openmsk.atomic.atomic_file`): a reader never sees a partial or
corrupt file. Every failure is a :class:`StorageError`: :class:`ObjectMissing` (no such object, or its bytes do
not match its checksum), :class:`StorageUnavailable` (the store does not answer: retry later),
:class:`StorageAccessDenied` (credentials refused).

Credentials are never settings: boto3 reads them from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) or its usual files; ``AWS_CA_BUNDLE`` names a CA bundle for an
https endpoint with a private CA. :meth:`ObjectStore.describe` never shows them.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.exceptions as boto_errors
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from openmsk.atomic import atomic_file
from openmsk.config import MANAGED_STORAGE, ConfigError, Settings, env_name

log = logging.getLogger(__name__)

SHA256_KEY = "sha256"  # the object metadata key (x-amz-meta-sha256) put_file records
CHUNK = 1024 * 1024
# The temporary files of openmsk.atomic (".<name>.<pid>.<thread>.tmp"): never objects, never listed.
_TEMP_NAME = re.compile(r"^\..+\.\d+\.\d+\.tmp$")
# S3 bucket names: 3-63 characters of lower-case letters, digits, dots and hyphens, starting and ending alnum.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StorageError(Exception):
    """Storing or fetching a file failed; ``str()`` is one line naming the path and the store."""


class ObjectMissing(StorageError):
    """The object does not exist, or its bytes do not match the SHA-256 recorded when it was stored."""


class StorageUnavailable(StorageError):
    """The store did not answer (down, unreachable, timed out, or failing with 5xx): worth retrying later."""


class StorageAccessDenied(StorageError):
    """The store refused the credentials or the request (HTTP 403)."""


@dataclass
class TreeFetch:
    """What :meth:`ObjectStore.fetch_tree` did: relative paths fetched, and those already present and intact."""

    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def check_rel(rel: str) -> str:
    """``rel`` as a clean relative POSIX path (``a/b/c``); ``ValueError`` for absolute paths, ``..``, empty."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ValueError(f"not a relative storage path: {rel!r}")
    if any(part in ("", ".", "..") for part in rel.split("/")):  # also a leading or doubled "/"
        raise ValueError(f"not a relative storage path: {rel!r}")
    return rel


def _folder(prefix: str) -> str:
    """A folder prefix: ``""`` (everything) or ``"a/b/"``; ``list("jobs/1")`` never matches ``jobs/10/``."""
    return "" if prefix in ("", "/") else check_rel(prefix.rstrip("/")) + "/"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _walk_files(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` (sorted, recursive), without atomic_file's temporary files or symlinks."""
    if not root.is_dir():
        return
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if not _TEMP_NAME.match(name) and not path.is_symlink() and path.is_file():
                yield path


class ObjectStore(abc.ABC):
    """Files by their path relative to DATA_DIR; see the module docstring for the guarantees."""

    @abc.abstractmethod
    def put_file(self, rel: str, local: Path) -> None:
        """Store the file ``local`` as ``rel`` (streamed; its SHA-256 recorded as metadata)."""

    @abc.abstractmethod
    def fetch(self, rel: str, local: Path) -> None:
        """Write object ``rel`` to ``local``: temporary file beside it, SHA-256 checked, fsync, atomic rename."""

    @abc.abstractmethod
    def exists(self, rel: str) -> bool:
        """Whether object ``rel`` exists."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every object under the folder ``prefix`` (recursive, sorted), as paths relative to DATA_DIR."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder ``prefix`` (not empty); returns how many were deleted."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for logs and /health: which store, where — never a secret."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise :class:`StorageError` unless the store answers (for /health and start-up)."""

    @abc.abstractmethod
    def _sizes(self, prefix: str) -> dict[str, int]:
        """``{rel: size}`` of every object under the folder ``prefix``."""

    @abc.abstractmethod
    def _checksum(self, rel: str) -> str | None:
        """The SHA-256 recorded for ``rel`` (None: none recorded); ObjectMissing if there is no object."""

    #: Whether the store is the DATA_DIR itself (nothing to upload or fetch on a single host).
    shared_disk: ClassVar[bool] = False

    def upload(self, rels: list[str], data_dir: Path) -> int:
        """Store each ``data_dir/<rel>`` as ``rel`` unless an object of the same size is there already.

        For what never changes under its name (received instances, named by SOP Instance UID; uploads, named
        by their upload id): one listing per folder instead of one request per file when a job's input is
        published again (a second model, a retry). Returns how many files were stored.
        """
        stored = 0
        listed: dict[str, dict[str, int]] = {}
        for rel in rels:
            folder = check_rel(rel).rpartition("/")[0]
            if folder not in listed:
                listed[folder] = self._sizes(_folder(folder))
            local = Path(data_dir) / rel
            try:
                size = local.stat().st_size
            except OSError:
                raise ObjectMissing(f"{local} does not exist: nothing to store as {rel}") from None
            if listed[folder].get(rel) != size:
                self.put_file(rel, local)
                stored += 1
        return stored

    def put_tree(self, rel_folder: str, local_folder: Path) -> list[str]:
        """Store every file under ``local_folder`` as ``rel_folder/<its relative path>``; returns those paths."""
        base = check_rel(rel_folder)
        stored = []
        for path in _walk_files(local_folder):
            rel = f"{base}/{path.relative_to(local_folder).as_posix()}"
            self.put_file(rel, path)
            stored.append(rel)
        return stored

    def fetch_tree(self, rel_folder: str, local_folder: Path) -> TreeFetch:
        """Fetch every object under ``rel_folder`` into ``local_folder`` (same relative layout).

        A local file is kept (``skipped``) when its size and SHA-256 equal the object's; anything else is
        fetched again. No object under ``rel_folder`` at all raises :class:`ObjectMissing`.
        """
        prefix = _folder(rel_folder)
        sizes = self._sizes(prefix)
        if not sizes:
            raise ObjectMissing(f"no objects under {prefix} in {self.describe()}")
        result = TreeFetch()
        for rel, size in sorted(sizes.items()):
            local = local_folder / rel[len(prefix) :]
            if self._intact(rel, size, local):
                result.skipped.append(rel)
            else:
                self.fetch(rel, local)
                result.fetched.append(rel)
        return result

    def _intact(self, rel: str, size: int, local: Path) -> bool:
        try:
            if not local.is_file() or local.stat().st_size != size:
                return False
        except OSError:
            return False
        recorded = self._checksum(rel)
        return recorded is not None and recorded == sha256_file(local)


class LocalStore(ObjectStore):
    """The single-host store: DATA_DIR itself. Storing is a no-op; fetching checks (or copies) the file."""

    shared_disk: ClassVar[bool] = True

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)

    def upload(self, rels: list[str], data_dir: Path) -> int:
        """Nothing to do when the files are in DATA_DIR already (the single-host case)."""
        if Path(data_dir).resolve() == self.data_dir.resolve():
            return 0
        return super().upload(rels, data_dir)

    def _path(self, rel: str) -> Path:
        return self.data_dir / check_rel(rel)

    def put_file(self, rel: str, local: Path) -> None:
        target = self._path(rel)
        if not local.is_file():
            raise ObjectMissing(f"{local} does not exist: nothing to store as {rel}")
        if Path(local).resolve() != target.resolve():
            # Not where DATA_DIR keeps it: copy it there, durably, so ``rel`` names it as on every other store.
            with open(local, "rb") as source, atomic_file(target) as out:
                shutil.copyfileobj(source, out, CHUNK)

    def fetch(self, rel: str, local: Path) -> None:
        source = self._path(rel)
        if not source.is_file():
            raise ObjectMissing(f"{rel} is not in {self.describe()}")
        if source.resolve() != Path(local).resolve():
            with open(source, "rb") as handle, atomic_file(local) as out:
                shutil.copyfileobj(handle, out, CHUNK)

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def list(self, prefix: str) -> list[str]:
        return sorted(self._sizes(_folder(prefix)))

    def delete_prefix(self, prefix: str) -> int:
        """Deletes the files under DATA_DIR/``prefix`` (on a single host they are the only copy)."""
        folder = _folder(prefix)
        if not folder:
            raise ValueError("delete_prefix needs a folder, not the whole store")
        root = self.data_dir / folder
        count = sum(1 for _ in _walk_files(root))
        if root.is_dir():
            shutil.rmtree(root)
        return count

    def describe(self) -> str:
        return f"local DATA_DIR {self.data_dir}"

    def check(self) -> None:
        if not self.data_dir.is_dir():
            raise StorageUnavailable(f"{self.describe()} does not exist")

    def _sizes(self, prefix: str) -> dict[str, int]:
        root = self.data_dir / prefix if prefix else self.data_dir
        return {p.relative_to(self.data_dir).as_posix(): p.stat().st_size for p in _walk_files(root)}

    def _checksum(self, rel: str) -> str | None:
        path = self._path(rel)
        if not path.is_file():
            raise ObjectMissing(f"{rel} is not in {self.describe()}")
        return sha256_file(path)

    def fetch_tree(self, rel_folder: str, local_folder: Path) -> TreeFetch:
        root = self.data_dir / _folder(rel_folder)
        if root.resolve() == Path(local_folder).resolve():
            listed = self.list(rel_folder)
            if not listed:
                raise ObjectMissing(f"no files under {_folder(rel_folder)} in {self.describe()}")
            return TreeFetch(skipped=listed)  # already where it is wanted
        return super().fetch_tree(rel_folder, local_folder)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` -> ``(bucket, "prefix/" or "")``; ``ValueError`` naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError("not an s3://bucket[/prefix] URL")
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        raise ValueError("an s3://bucket[/prefix] URL has no credentials, port, query or fragment")
    bucket = parts.netloc
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(f"{bucket!r} is not an S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            prefix = check_rel(prefix) + "/"
        except ValueError:
            raise ValueError(f"{parts.path!r} is not a clean key prefix") from None
    return bucket, prefix


def _redact(url: str) -> str:
    """An endpoint URL without any user:password@ part."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


_DENIED = {
    "403",
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
}
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


class S3Store(ObjectStore):
    """An S3 bucket (optionally under a key prefix): AWS S3, or SeaweedFS/MinIO at ``endpoint_url``.

    Short connect/read timeouts and one retry, so a store that is down is a :class:`StorageUnavailable` within
    seconds rather than minutes. The bucket is created on first use if it does not exist.
    """

    CONNECT_TIMEOUT_S = 3.0
    READ_TIMEOUT_S = 5.0
    MAX_ATTEMPTS = 2  # the first try and one retry

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        session = boto3.session.Session()  # credentials: the environment / boto3's usual chain
        self.region = region or session.region_name or "us-east-1"
        config = Config(
            connect_timeout=self.CONNECT_TIMEOUT_S,
            read_timeout=self.READ_TIMEOUT_S,
            retries={"max_attempts": self.MAX_ATTEMPTS, "mode": "standard"},
            # SeaweedFS and MinIO serve buckets as paths; AWS picks virtual hosts itself.
            s3={"addressing_style": "path"} if self.endpoint_url else {},
        )
        self._client = session.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
        )
        # Uploads above 64 MB go in parts (several at once); DICOM instances are one PUT each.
        self._transfer = TransferConfig(multipart_threshold=64 * CHUNK, multipart_chunksize=16 * CHUNK)
        self._bucket_ready = False
        self._lock = threading.Lock()

    # --- helpers ---

    def _key(self, rel: str) -> str:
        return self.prefix + check_rel(rel)

    def describe(self) -> str:
        where = _redact(self.endpoint_url) if self.endpoint_url else f"AWS S3 ({self.region})"
        return f"s3://{self.bucket}/{self.prefix} at {where}"

    def _error(self, exc: BaseException, what: str) -> StorageError:
        """The StorageError for a boto3/botocore exception raised while doing ``what``."""
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
            exc = exc.__context__
        where = self.describe()
        if isinstance(exc, boto_errors.SSLError):
            return StorageError(
                f"{what}: TLS with {where} failed ({exc}); a private CA goes in AWS_CA_BUNDLE"
            )
        if isinstance(exc, boto_errors.NoCredentialsError | boto_errors.PartialCredentialsError):
            return StorageAccessDenied(
                f"{what}: no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(exc, boto_errors.ConnectionError | boto_errors.HTTPClientError):
            return StorageUnavailable(f"{what}: {where} is unreachable ({type(exc).__name__})")
        if isinstance(exc, boto_errors.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _DENIED or status == 403:
                return StorageAccessDenied(
                    f"{what}: {where} refused the request ({code or status}): check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY and the bucket's permissions"
                )
            if code in _MISSING or status == 404:
                return ObjectMissing(f"{what}: not found in {where}")
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
                return StorageUnavailable(f"{what}: {where} failed ({code or status})")
            return StorageError(
                f"{what}: {where} answered {code or status}: {error.get('Message', '')}".strip()
            )
        if isinstance(exc, boto_errors.BotoCoreError):
            return StorageError(f"{what}: {where}: {exc}")
        raise exc

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._lock:
            if self._bucket_ready:
                return
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except boto_errors.ClientError as exc:
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                if status != 404 and exc.response.get("Error", {}).get("Code") not in _MISSING:
                    raise self._error(exc, f"bucket {self.bucket}") from None
                self._create_bucket()
            except (boto_errors.BotoCoreError, S3UploadFailedError) as exc:
                raise self._error(exc, f"bucket {self.bucket}") from None
            self._bucket_ready = True

    def _create_bucket(self) -> None:
        kwargs: dict[str, object] = {"Bucket": self.bucket}
        if self.region != "us-east-1" and not self.endpoint_url:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
            log.info("created bucket %s in %s", self.bucket, self.describe())
        except boto_errors.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                return  # created meanwhile by another process
            error = self._error(exc, f"creating bucket {self.bucket}")
            raise type(error)(f"the bucket does not exist and could not be created: {error}") from None
        except boto_errors.BotoCoreError as exc:
            raise self._error(exc, f"creating bucket {self.bucket}") from None

    # --- the interface ---

    def check(self) -> None:
        self._bucket_ready = False
        self._ensure_bucket()

    def put_file(self, rel: str, local: Path) -> None:
        key = self._key(rel)
        self._ensure_bucket()
        try:
            digest = sha256_file(local)
        except OSError as exc:
            raise ObjectMissing(
                f"{local} cannot be read ({exc.strerror}): nothing to store as {rel}"
            ) from None
        try:
            self._client.upload_file(
                str(local),
                self.bucket,
                key,
                ExtraArgs={"Metadata": {SHA256_KEY: digest}},
                Config=self._transfer,
            )
        except (boto_errors.BotoCoreError, boto_errors.ClientError, S3UploadFailedError) as exc:
            raise self._error(exc, f"storing {rel}") from None

    def fetch(self, rel: str, local: Path) -> None:
        key = self._key(rel)
        self._ensure_bucket()
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
            raise self._error(exc, f"fetching {rel}") from None
        body = response["Body"]
        try:
            expected = response.get("Metadata", {}).get(SHA256_KEY)
            if not expected:
                raise ObjectMissing(
                    f"fetching {rel}: the object in {self.describe()} has no sha256 metadata "
                    "(not stored by openmsk): refused"
                )
            digest = hashlib.sha256()
            size = 0
            with atomic_file(local) as out:
                for block in body.iter_chunks(CHUNK):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
                if digest.hexdigest() != expected:
                    # raised inside the block: the temporary file goes, ``local`` stays as it was
                    raise ObjectMissing(
                        f"fetching {rel}: checksum mismatch in {self.describe()}: SHA-256 of the "
                        f"{size} bytes read is {digest.hexdigest()}, the object's metadata says {expected} "
                        "(corrupt or overwritten object)"
                    )
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
            raise self._error(exc, f"fetching {rel}") from None
        finally:
            body.close()

    def exists(self, rel: str) -> bool:
        key = self._key(rel)
        self._ensure_bucket()
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
            error = self._error(exc, f"looking up {rel}")
            if isinstance(error, ObjectMissing):
                return False
            raise error from None

    def _sizes(self, prefix: str) -> dict[str, int]:
        self._ensure_bucket()
        sizes: dict[str, int] = {}
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    rel = item["Key"][len(self.prefix) :]
                    if not rel.endswith("/"):  # a folder marker, not a file
                        sizes[rel] = int(item["Size"])
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
            raise self._error(exc, f"listing {prefix or '/'}") from None
        return sizes

    def list(self, prefix: str) -> list[str]:
        return sorted(self._sizes(_folder(prefix)))

    def delete_prefix(self, prefix: str) -> int:
        folder = _folder(prefix)
        if not folder:
            raise ValueError("delete_prefix needs a folder, not the whole store")
        keys = [self.prefix + rel for rel in self._sizes(folder)]
        deleted = 0
        try:
            for start in range(0, len(keys), 1000):
                batch = keys[start : start + 1000]
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                errors = response.get("Errors", [])
                if errors:
                    first = errors[0]
                    raise StorageError(
                        f"deleting {folder}: {len(errors)} objects not deleted from {self.describe()}, "
                        f"e.g. {first.get('Key')} ({first.get('Code')})"
                    )
                deleted += len(batch)
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
            raise self._error(exc, f"deleting {folder}") from None
        return deleted

    def _checksum(self, rel: str) -> str | None:
        key = self._key(rel)
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=key)
        except (boto_errors.BotoCoreError, boto_errors.ClientError) as exc:
            raise self._error(exc, f"looking up {rel}") from None
        return response.get("Metadata", {}).get(SHA256_KEY)


def store_for(settings: Settings) -> ObjectStore:
    """The node's store: :class:`LocalStore` without ``OPENMSK_STORAGE_URL``, else :class:`S3Store`.

    A bad URL is a one-line :class:`ConfigError` naming the variable.
    """
    if not settings.storage_url:
        return LocalStore(settings.data_path)
    if settings.storage_url == MANAGED_STORAGE:
        raise ConfigError(
            f"{env_name('storage_url')}=managed is for `openmsk up`, which starts the store and gives its "
            "children its s3:// URL; a service run on its own needs that URL"
        )
    try:
        parse_s3_url(settings.storage_url)
    except ValueError as exc:
        shown = re.sub(r"^(s3://)[^/@]*@", r"\1***@", settings.storage_url)  # never echo credentials
        raise ConfigError(
            f"{env_name('storage_url')}={shown!r} is invalid: {exc}; expected "
            f"{Settings.model_fields['storage_url'].description}"
        ) from None
    return S3Store(settings.storage_url, endpoint_url=settings.storage_endpoint_url)


class FetchCache:
    """A worker's fetched inputs under its own DATA_DIR, kept within ``limit_bytes`` (least recently used go).

    The cache *is* the DATA_DIR subtrees ``incoming/`` and ``uploads/``: an entry is one series folder
    (``incoming/<study>/<series>``) or one upload (``uploads/<id>``) — the first ``depth`` parts of a path under
    each root of ``roots``. Its last use is the folder's modification time, set on every :meth:`ensure`.
    Paths under no root (``jobs/<id>/...``: a worker's own outputs) are fetched but never evicted.

    With a :class:`LocalStore` nothing is fetched and nothing is ever evicted: the disk is the only copy.
    Use it only where DATA_DIR is the worker's own (a host that shares no disk with the node): eviction deletes
    files there. One cache per DATA_DIR: entries in use by another process's call are not protected.
    """

    ROOTS: ClassVar[dict[str, int]] = {"incoming": 3, "uploads": 2}

    def __init__(
        self,
        store: ObjectStore,
        data_dir: Path,
        limit_bytes: int,
        roots: dict[str, int] | None = None,
    ) -> None:
        self.store = store
        self.data_dir = Path(data_dir)
        self.limit_bytes = limit_bytes
        self.roots = dict(self.ROOTS if roots is None else roots)
        if any(depth < 2 for depth in self.roots.values()):
            raise ValueError("a cache entry is at least two folders deep (root/<entry>)")
        self._lock = threading.Lock()
        self._stamp = 0

    def ensure(self, rel_paths: list[str]) -> Path:
        """Make every path (a file or a folder) present under DATA_DIR; returns DATA_DIR.

        Missing or damaged files are fetched (a folder: :meth:`ObjectStore.fetch_tree`), the entries used are
        marked as used now, then least recently used entries of earlier calls are removed until the cache is
        within the limit (the entries of this call are never removed, even when they alone exceed it).
        """
        rels = [check_rel(rel.rstrip("/")) for rel in rel_paths]
        if isinstance(self.store, LocalStore):
            for rel in rels:
                if not (self.data_dir / rel).exists():
                    raise ObjectMissing(f"{rel} is not in {self.store.describe()}")
            return self.data_dir
        with self._lock:
            for rel in rels:
                if self.store.list(rel):  # a folder of objects
                    self.store.fetch_tree(rel, self.data_dir / rel)
                elif not self._file_intact(rel):
                    self.store.fetch(rel, self.data_dir / rel)
            # In use: the entries holding a path of this call, and those inside one (a whole study, say).
            in_use = {
                entry
                for _, _, entry in self.entries()
                if any(
                    entry == rel or rel.startswith(f"{entry}/") or entry.startswith(f"{rel}/") for rel in rels
                )
            }
            # Explicit nanosecond stamps, strictly increasing: the file system's own clock ticks coarsely.
            self._stamp = max(time.time_ns(), self._stamp + 1)
            for entry in sorted(in_use):
                os.utime(self.data_dir / entry, ns=(self._stamp, self._stamp))
            self._evict(in_use)
        return self.data_dir

    def _file_intact(self, rel: str) -> bool:
        local = self.data_dir / rel
        if not local.is_file():
            return False
        try:
            size = local.stat().st_size
            return self.store._intact(rel, size, local)
        except ObjectMissing:
            return False

    def entries(self) -> list[tuple[int, int, str]]:
        """``(last use in ns, bytes, entry)`` of every cached entry, least recently used first."""
        found = []
        for root, depth in self.roots.items():
            base = self.data_dir / root
            if not base.is_dir():
                continue
            for folder in base.glob("/".join(["*"] * (depth - 1))):
                if folder.is_dir() and not folder.is_symlink():
                    size = sum(p.stat().st_size for p in _walk_files(folder))
                    found.append(
                        (folder.stat().st_mtime_ns, size, folder.relative_to(self.data_dir).as_posix())
                    )
        return sorted(found)

    def _evict(self, in_use: set[str]) -> None:
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, entry in entries:
            if total <= self.limit_bytes:
                break
            if entry in in_use:
                continue
            shutil.rmtree(self.data_dir / entry, ignore_errors=True)
            self._prune_parents(self.data_dir / entry)
            total -= size
            log.info("fetch cache: removed %s (%d bytes, least recently used)", entry, size)
        if total > self.limit_bytes:
            log.warning("fetch cache: %d bytes in use exceed the limit of %d bytes", total, self.limit_bytes)

    def _prune_parents(self, folder: Path) -> None:
        """Remove the folders left empty between an evicted entry and its root (``incoming/<study>``)."""
        parent = folder.parent
        while parent != self.data_dir and parent.parent != self.data_dir:
            try:
                parent.rmdir()
            except OSError:
                return
            parent = parent.parent
