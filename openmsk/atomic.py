"""One way to write a file so that a reader, or a restart after a crash, never sees half of it.

:func:`atomic_file` (and :func:`write_atomic` for bytes already in memory) writes to a temporary file in the
target's folder, flushes and ``fsync``s it, renames it over the target (``os.replace``: atomic on one POSIX file
system) and ``fsync``s the folder, so the new name survives a power loss as well. On any error the temporary
file is removed and the target is left as it was.

Guarantee relied on: rename within one folder is atomic and a folder's ``fsync`` makes its entries durable —
true on local ext4, XFS and btrfs, and on NFSv3+/v4 with ``sync`` exports. It does not hold on file systems
without a durable rename (some FUSE and object-store mounts): keep DATA_DIR off those.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_folder(path: Path) -> None:
    """``fsync`` a folder, making the names in it (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o644, exclusive: bool = False) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` atomically and durably when the block ends cleanly.

    ``exclusive``: create ``path`` only if it does not exist (``FileExistsError`` otherwise, the existing file
    untouched) — a hard link of the finished temporary file, so nobody ever reads a new file half-written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # pid + thread: two writers of the same target never share a temporary file.
    temp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(temp, target)
            temp.unlink()
        else:
            os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)


def write_atomic(path: str | Path, data: bytes | str, mode: int = 0o644, exclusive: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` as :func:`atomic_file` does; returns the path."""
    with atomic_file(path, mode, exclusive) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
