"""Helpers for tests that run the node's own commands as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests

from openmsk.config import Settings

T = TypeVar("T")


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process read ``settings`` (plus ``extra`` OPENMSK_* values)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENMSK_")}
    for name, value in settings.model_dump(exclude_none=True).items():
        if isinstance(value, list):
            value = ",".join(value)
        env[f"OPENMSK_{name.upper()}"] = str(value)
    env.update(extra)
    return env


def openmsk(command: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``openmsk COMMAND`` with its output in ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "openmsk", command], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def wait_for(
    check: Callable[[], T], timeout_s: float = 30.0, what: str = "condition", interval_s: float = 0.05
) -> T:
    """Poll ``check`` until it returns something true and return that; fail the test on timeout.

    The one waiting helper of the tests: a peer that is not up yet (connection refused) counts as "not yet".
    """
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = check()
        except (requests.RequestException, OSError) as exc:
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise AssertionError(f"{what} not reached within {timeout_s} s{detail}")
        time.sleep(interval_s)


def health(port: int) -> tuple[int, dict]:
    response = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    return response.status_code, response.json()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
