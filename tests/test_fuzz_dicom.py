"""DICOM fuzzing of the running SCP (its own process): pydicom(-data)'s test files and 2000 seeded mutations.

Every case must be answered with a proper C-STORE status over a live association (none crashed), what is
stored must be byte for byte what was sent, the unmutated cases must be stored, and afterwards the SCP still
answers C-ECHO and stores a valid series. The mutations are in :mod:`tests.dicom_fuzz`.
"""

from __future__ import annotations

import collections
import os
import subprocess
from pathlib import Path

import pytest
from pynetdicom.dsutils import split_dataset

from openmsk.config import Settings
from tests.dicom_fuzz import mutation_cases, pydicom_file_cases, run_cases
from tests.mr_series import write_mr_series
from tests.processes import openmsk, settings_env, wait_for

SEED = 20261203
MUTATIONS = 2000
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def echo(port: int) -> bool:
    result = subprocess.run(
        ["echoscu", "-aec", "OPENMSK", "127.0.0.1", str(port)], env=DCMTK_ENV, capture_output=True, timeout=30
    )
    return result.returncode == 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzzed_instances_get_a_status_and_the_scp_stays_up(settings: Settings, tmp_path: Path) -> None:
    configured = settings.model_copy(update={"min_free_disk_mb": 0, "series_quiet_s": 0.5})
    scp = openmsk("scp", settings_env(configured), tmp_path / "scp.log")
    try:
        port = configured.scp_port
        wait_for(lambda: echo(port), 30, "SCP listening")
        corpus = list(pydicom_file_cases())
        mutated = list(mutation_cases(SEED, MUTATIONS))
        counts, results = run_cases("127.0.0.1", port, corpus + mutated)

        by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for case, _, outcome in results:
            kind = "pydicom testdata" if case.name.startswith("pydicom testdata") else case.name
            by_kind[kind][outcome] += 1
        print(f"\n{len(corpus)} pydicom test files + {len(mutated)} mutations: {counts}")
        for kind, tally in sorted(by_kind.items()):
            print(f"  {kind:28s} {dict(tally)}")
        assert counts.sent >= len(mutated)  # every mutation went out on a negotiated context
        assert counts.crashed == 0, [(c.name, s) for c, s, outcome in results if outcome == "crashed"][:5]
        assert scp.poll() is None, (tmp_path / "scp.log").read_text()[-2000:]
        assert by_kind["valid"]["stored"] == by_kind["valid"].total() > 0
        assert counts.rejected > len(mutated) // 2  # most mutations are broken: a store-everything SCP fails

        # What was acknowledged is on disk exactly as sent (last send wins for a repeated SOP Instance UID),
        # and nothing else is: no refused case and no partial file.
        acknowledged = {c.sop_instance_uid: c.data for c, _, outcome in results if outcome == "stored"}
        incoming = settings.data_path / "incoming"
        stored = {p.stem: p for p in incoming.rglob("*.dcm") if ".partial" not in p.parts}
        assert set(stored) == set(acknowledged)
        for uid, path in stored.items():
            _, offset = split_dataset(path)
            assert path.read_bytes()[offset:] == acknowledged[uid], uid
        leftovers = [p for p in (incoming / ".partial").iterdir() if not p.name.startswith("spare.")]
        assert leftovers == []

        # Still up: C-ECHO, and a valid series sent afterwards is stored.
        assert echo(port)
        good = write_mr_series(tmp_path / "good", 2, 16, 16, seed=SEED)
        result = subprocess.run(
            ["storescu", "-aec", "OPENMSK", "127.0.0.1", str(port), *map(str, good)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert len([p for p in incoming.rglob("*.dcm") if ".partial" not in p.parts]) == len(stored) + 2
        assert scp.poll() is None
    finally:
        scp.kill()
        scp.wait(timeout=10)
