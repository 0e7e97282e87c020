"""Unpacking zip files from outside the node safely: no path tricks, no links, no zip bombs.

Used wherever a zip arrives from a client or a site (uploads, ``openmsk segment``, ``openmsk models install``).
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


class UnsafeArchive(ValueError):
    """The zip is refused; the message says why (and names the entry)."""


@dataclass(frozen=True)
class ZipLimits:
    max_total_bytes: int = 4 * 1024**3
    max_entries: int = 20_000
    max_ratio: float = 200.0  # uncompressed / compressed, per entry and overall


def _check_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchive(f"zip entry {name!r} points outside the archive")
    return path


def check_zip(archive: zipfile.ZipFile, limits: ZipLimits = ZipLimits()) -> list[zipfile.ZipInfo]:
    """Validate every entry against the limits before anything is written; return the file entries."""
    infos = archive.infolist()
    if len(infos) > limits.max_entries:
        raise UnsafeArchive(f"zip has {len(infos)} entries; at most {limits.max_entries} are accepted")
    total = compressed = 0
    files = []
    for info in infos:
        _check_name(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchive(f"zip entry {info.filename!r} is a symbolic link")
        if info.is_dir():
            continue
        if info.file_size > 1024 * 1024 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise UnsafeArchive(
                f"zip entry {info.filename!r} expands {info.file_size // max(info.compress_size, 1)}×"
            )
        total += info.file_size
        compressed += info.compress_size
        files.append(info)
    if total > limits.max_total_bytes:
        raise UnsafeArchive(f"zip expands to {total} bytes; at most {limits.max_total_bytes} are accepted")
    if total > 16 * 1024 * 1024 and total > limits.max_ratio * max(compressed, 1):
        raise UnsafeArchive("zip expands too much for its size (zip bomb?)")
    return files


def safe_extract(zip_path: Path, dest: Path, limits: ZipLimits = ZipLimits()) -> list[Path]:
    """Extract ``zip_path`` into ``dest`` after :func:`check_zip`; sizes are enforced while writing too,
    because the sizes in a zip's directory are the sender's claim."""
    written: list[Path] = []
    budget = limits.max_total_bytes
    with zipfile.ZipFile(zip_path) as archive:
        for info in check_zip(archive, limits):
            target = dest.joinpath(*_check_name(info.filename).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as out:
                copied = 0
                while chunk := src.read(1024 * 1024):
                    copied += len(chunk)
                    if copied > info.file_size or copied > budget:
                        raise UnsafeArchive(f"zip entry {info.filename!r} is larger than its header says")
                    out.write(chunk)
                budget -= copied
            written.append(target)
    return written


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
