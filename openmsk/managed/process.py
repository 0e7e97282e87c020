"""Starting and stopping child processes so that none outlives the node."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when the thread that started it ends (run in the child)."""
    # the child gets SIGTERM if the node is killed outright, so even `kill -9 <up>` leaves nothing behind
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """Start ``argv`` in its own process group (so it and its children can be stopped together).

    Output goes to ``log`` when given, else to this process's own stdout/stderr.
    """
    out = open(log, "ab") if log else None  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log else None,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    finally:
        if log:
            out.close()


def stop(proc: subprocess.Popen, timeout_s: float = 8.0) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after ``timeout_s``."""
    stop_all([proc], timeout_s)


def stop_all(procs: Sequence[subprocess.Popen], timeout_s: float = 8.0) -> None:
    """Stop several children at once: all get SIGTERM together, so the total wait is ``timeout_s``, not a sum."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    # A leader may be gone while its own children linger: sweep every group either way.
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen | None = None
) -> None:
    """Poll ``check`` until it is true; raise ``RuntimeError`` naming ``what`` on timeout or if ``proc`` died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not become ready within {timeout_s:.0f} s")
