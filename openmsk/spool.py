"""A folder of durable JSON records, one file each: what the SCP's job outbox and the forward outbox share.

A record is written with :func:`openmsk.atomic.write_atomic` (so it is whole or absent after a crash), read
back oldest first (``created_at``), and removed once handled. A file that cannot be read is moved aside as
``<name>.bad`` and logged, never retried forever.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import BaseModel

from openmsk.atomic import write_atomic

LOG = logging.getLogger("openmsk.spool")

Record = TypeVar("Record", bound=BaseModel)

#: The SCP's job outbox under DATA_DIR (jobs waiting for Redis); retention reads it to keep their inputs.
JOB_SPOOL = "spool"


class RecordFolder(Generic[Record]):
    """Records of one pydantic model (with a ``created_at``) under ``root``, named ``<name>.json``."""

    def __init__(self, root: Path, model: type[Record]) -> None:
        self.root, self.model = root, model
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, record: Record) -> None:
        write_atomic(self.root / f"{name}.json", record.model_dump_json())

    def read_all(self) -> list[Record]:
        """Every readable record, oldest first (unreadable files are moved aside)."""
        found = []
        for path in self.root.glob("*.json"):
            try:
                found.append(self.model.model_validate_json(path.read_bytes()))
            except FileNotFoundError:
                continue  # handled and removed meanwhile
            except (OSError, ValueError):
                LOG.error("record %s is unreadable; moved to %s.bad", path, path.stem)
                path.replace(path.with_suffix(".bad"))
        return sorted(found, key=lambda record: record.created_at)  # type: ignore[attr-defined]

    def delete(self, name: str) -> None:
        (self.root / f"{name}.json").unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.json"))
