"""openmsk.atomic: the one durable, atomic write every room uses."""

from __future__ import annotations

import os
import stat

import pytest

from openmsk.atomic import atomic_file, write_atomic


def test_replaces_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "record.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]


def test_failure_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "seg.dcm"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as handle:
        handle.write(b"half a fi")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["seg.dcm"]


def test_exclusive_never_overwrites_and_sets_the_mode(tmp_path):
    target = tmp_path / "secret"
    write_atomic(target, "one\n", mode=0o600, exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomic(target, "two\n", mode=0o600, exclusive=True)
    assert target.read_text() == "one\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_atomic(tmp_path / "x", b"1")
    assert synced == [False, True]  # the file's data first, then its folder's entry
