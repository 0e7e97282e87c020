"""The SCP with several receiver processes on one port (``OPENMSK_SCP_PROCESSES``, :mod:`scp.receivers`).

Real peers (storescu, echoscu, pynetdicom, Redis): associations spread over the receivers still make one job
per series; a receiver SIGKILLed mid-stream loses nothing acknowledged and is started again; the allowlist
and the association limit hold in every receiver; a full disk is answered Out of Resources, with
nothing half-written; SIGTERM of ``openmsk scp`` leaves no receiver behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from openmsk import audit
from openmsk.config import Settings
from openmsk.jobs import JobStore
from scp.server import StorageSCP
from tests.mr_series import write_mr_series
from tests.processes import descendants, openmsk, settings_env, wait_for
from tests.test_faults import (
    DCMTK_ENV,
    dataset_bytes,
    partial_leftovers,
    pynetdicom_send,
    pynetdicom_statuses,
    small_file_system,
    sop_of,
    stored_files,
    storescu,
)


def configured(settings: Settings, **overrides: object) -> Settings:
    values = {
        "scp_processes": 2,
        "min_free_disk_mb": 0,
        "series_quiet_s": 0.5,
        "series_timeout_s": 10.0,
        **overrides,
    }
    return settings.model_copy(update=values)


def echo(port: int, calling: str = "ECHOSCU") -> bool:
    result = subprocess.run(
        ["echoscu", "-aet", calling, "-aec", "OPENMSK", "127.0.0.1", str(port)],
        env=DCMTK_ENV, capture_output=True, timeout=30,
    )  # fmt: skip
    return result.returncode == 0


def jobs_of(settings: Settings, series_uid: str) -> list:
    return [
        j for j in JobStore.from_url(str(settings.redis_url)).list(limit=100) if j.series_uid == series_uid
    ]


def test_concurrent_associations_over_receivers_complete_one_series_as_one_job(
    settings: Settings, tmp_path: Path
) -> None:
    config = configured(settings)
    files = write_mr_series(tmp_path / "series", 48, 32, 32, seed=11)
    study_uid, series_uid, _ = sop_of(files[0])
    parts = [files[n::4] for n in range(4)]
    with StorageSCP(config) as scp:
        assert len(scp.pool.pids()) == 2
        with ThreadPoolExecutor(4) as pool:
            acknowledged = set().union(
                *pool.map(lambda n: storescu(scp.port, parts[n], f"PART{n}"), range(4))
            )
        by_uid = {sop_of(p)[2]: p for p in files}
        assert acknowledged == set(by_uid)
        stored = stored_files(config.data_path)
        assert set(stored) == acknowledged
        for uid, path in stored.items():
            assert dataset_bytes(path) == dataset_bytes(by_uid[uid]), uid
        wait_for(lambda: jobs_of(config, series_uid), 20, "series queued")
        time.sleep(config.series_quiet_s + 1)  # a second (partial) job would show up by now
        found = jobs_of(config, series_uid)
        assert len(found) == 1, [(j.id, len(j.sop_uids)) for j in found]
        assert sorted(found[0].sop_uids) == sorted(by_uid) and found[0].study_uid == study_uid
        assert len(scp.completed) == 1


def test_receiver_killed_mid_stream_keeps_what_it_acknowledged_and_is_restarted(
    settings: Settings, tmp_path: Path
) -> None:
    config = configured(settings, series_quiet_s=1.0)
    files = write_mr_series(tmp_path / "series", 60, 64, 64, seed=12)
    _, series_uid, _ = sop_of(files[0])
    by_uid = {sop_of(p)[2]: p for p in files}
    with StorageSCP(config) as scp:
        before = set(scp.pool.pids())
        acked: set[str] = set()
        sender = threading.Thread(target=pynetdicom_send, args=(scp.port, files, "KILLTEST", acked))
        sender.start()
        wait_for(lambda: len(acked) >= 20, 60, "20 instances acknowledged")
        serving = {key[0] for series in scp.tracker.pending() for key in series.open_associations}
        assert len(serving) == 1 and serving <= before, serving
        os.kill(serving.pop(), signal.SIGKILL)  # mid-stream: the sender is still sending
        sender.join(timeout=60)
        acknowledged = set(acked)
        assert 20 <= len(acknowledged) < len(files), len(acknowledged)

        stored = stored_files(config.data_path)
        assert acknowledged <= set(stored)  # every acknowledged instance survived the kill ...
        for uid, path in stored.items():  # ... and everything in the series folder is complete
            assert dataset_bytes(path) == dataset_bytes(by_uid[uid]), uid
        # Restarted, with the dead receiver's leftovers recovered or deleted.
        wait_for(lambda: len(scp.pool.pids()) == 2 and scp.pool.restarts == 1, 30, "receiver restarted")
        wait_for(lambda: scp.pool.cleanups == 1, 30, "its leftovers cleaned up")
        assert set(scp.pool.pids()) != before
        assert partial_leftovers(config.data_path) == []
        assert all(echo(scp.port) for _ in range(6))  # whichever receiver the kernel picks answers

        rest = [p for p in files if sop_of(p)[2] not in acknowledged]
        assert storescu(scp.port, rest, "KILLTEST") == {sop_of(p)[2] for p in rest}
        wait_for(lambda: jobs_of(config, series_uid), 30, "series queued")
        time.sleep(config.series_quiet_s + 1)
        found = jobs_of(config, series_uid)
        assert len(found) == 1, [(j.id, len(j.sop_uids)) for j in found]
        assert sorted(found[0].sop_uids) == sorted(by_uid)


def test_every_receiver_enforces_the_allowlist_and_the_audit_lines_stay_whole(
    settings: Settings, tmp_path: Path
) -> None:
    config = configured(settings, scp_allowed_calling_aes="GOODAE")
    log = tmp_path / "scp.log"
    proc = openmsk("scp", settings_env(config), log)
    try:
        wait_for(lambda: echo(config.scp_port, "GOODAE") or proc.poll() is not None, 60, "SCP listening")
        assert proc.poll() is None, log.read_text()[-2000:]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: echo(config.scp_port, "BADAE"), range(24)))
        assert not any(results)
        assert echo(config.scp_port, "GOODAE")
        # Both receivers saw some (the kernel spreads connections by their ports: 24 on one has p = 2^-23).
        text = log.read_text()
        for index in range(2):
            assert f"[receiver {index}]: rejected BADAE" in text, text[-3000:]
        lines = audit.AuditLog(config.data_path).path.read_text().splitlines()
        entries = [json.loads(line) for line in lines]  # every line whole, none interleaved
        rejected = [e for e in entries if e.get("reason") == "calling-ae"]
        assert len(rejected) == 24
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_the_association_limit_is_a_total_over_the_receivers(settings: Settings) -> None:
    config = configured(settings, scp_max_associations=2)
    with StorageSCP(config) as scp:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        held = []
        try:
            for _ in range(6):  # whichever receivers the kernel picks: two are served in all
                assoc = ae.associate("127.0.0.1", scp.port, ae_title="OPENMSK")
                if assoc.is_established:
                    held.append(assoc)
                else:
                    assert assoc.is_rejected
            assert len(held) == 2
        finally:
            for assoc in held:
                assoc.release()
        wait_for(lambda: sum(scp.pool.slots[:]) == 0, 10, "associations counted out")
        assert echo(scp.port)


def test_sigterm_of_openmsk_scp_stops_every_receiver(settings: Settings, tmp_path: Path) -> None:
    config = configured(settings, scp_processes=3)
    log = tmp_path / "scp.log"
    proc = openmsk("scp", settings_env(config), log)
    try:
        wait_for(lambda: echo(config.scp_port) or proc.poll() is not None, 60, "SCP listening")
        children = descendants(proc.pid)
        assert len(children) >= 3, children  # the receivers (and multiprocessing's resource tracker)
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0, log.read_text()[-2000:]
    wait_for(lambda: not (descendants(proc.pid) or any(_alive(pid) for pid in children)), 10, "all gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and ") Z" not in stat.read_text()


def test_receivers_exit_when_openmsk_scp_is_killed(settings: Settings, tmp_path: Path) -> None:
    config = configured(settings)
    log = tmp_path / "scp.log"
    proc = openmsk("scp", settings_env(config), log)
    try:
        wait_for(lambda: echo(config.scp_port) or proc.poll() is not None, 60, "SCP listening")
        children = descendants(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=15)
    wait_for(lambda: not any(_alive(pid) for pid in children), 10, "receivers gone with their parent")
    assert not echo(config.scp_port)


def test_tls_and_the_disk_guard_hold_in_every_receiver(settings: Settings, tmp_path: Path) -> None:
    from tests.test_scp_receive import _certificates, dcmtk

    certs = _certificates(tmp_path / "certs")
    tls = {
        "scp_tls_cert": certs / "server.crt",
        "scp_tls_key": certs / "server.key",
        "scp_tls_ca": certs / "ca.crt",
        "scp_tls_require_client_cert": True,
    }
    source = write_mr_series(tmp_path / "s", 2, 16, 16)
    with StorageSCP(configured(settings, **tls)) as scp:
        for _ in range(4):  # over both receivers, most likely (each connection hashed anew)
            result = dcmtk("storescu", "+tls", str(certs / "client.key"), str(certs / "client.crt"), "+cf",
                           str(certs / "ca.crt"), "-aec", "OPENMSK", "127.0.0.1", str(scp.port),
                           *map(str, source))  # fmt: skip
            assert result.returncode == 0, result.stderr
        assert not any(echo(scp.port) for _ in range(6))  # TLS only, whichever receiver answers
    assert len(stored_files(settings.data_path)) == 2
    full = configured(settings, min_free_disk_mb=1 << 40)  # a petabyte free: no disk has that
    with StorageSCP(full) as scp:
        assert not any(echo(scp.port) for _ in range(6))  # rejected (temporary congestion) by each


def test_recovery_after_a_dead_receiver_leaves_the_files_of_the_others_alone(settings: Settings) -> None:
    from scp.storage import InstanceStore

    store = InstanceStore(settings.data_path)
    mine = [store.partial / "spare.111.5.1", store.partial / "1.2.3.0badc0de.111.7"]
    others = [store.partial / "spare.222.5.1", store.partial / "1.2.3.0badc0de.222.7"]
    for path in mine + others:
        path.write_bytes(b"not an instance")
    assert store.recover_partial(pid=111) == (0, 2)
    assert [p.exists() for p in mine + others] == [False, False, True, True]


def test_a_full_disk_is_out_of_resources_with_receivers_and_nothing_is_half_written(
    settings: Settings, tmp_path: Path
) -> None:
    """Four associations fill an 8 MB file system through two receivers (which one serves which is the
    kernel's hash): each C-STORE gets Success or Out of Resources (0xA7xx), what was acknowledged is stored
    whole, nothing else is, and once space returns the refused instances are taken."""
    with small_file_system(tmp_path / "small", "8m") as data:
        config = configured(settings, data_dir=data)
        series = [write_mr_series(tmp_path / f"s{n}", 10, 512, 256, seed=30 + n) for n in range(4)]  # 10 MB
        by_uid = {sop_of(p)[2]: p for files in series for p in files}
        ballast = data / "ballast"
        with StorageSCP(config) as scp:
            ballast.write_bytes(b"\0" * (1 << 20))  # 1 MB to free later
            with ThreadPoolExecutor(4) as pool:
                statuses = list(
                    pool.map(lambda n: pynetdicom_statuses(scp.port, series[n], f"FILL{n}"), range(4))
                )
            assert [len(s) for s in statuses] == [len(f) for f in series]  # every C-STORE answered
            flat = [s for per in statuses for s in per]
            refused = [s for s in flat if s != 0]
            print(f"\n{flat.count(0)} stored, {len(refused)} refused: {sorted({hex(s) for s in refused})}")
            assert flat.count(0) > 0 and refused, statuses
            assert all(s >> 8 == 0xA7 for s in refused)  # Out of Resources, nothing else
            acked = {
                sop_of(p)[2] for files, per in zip(series, statuses, strict=True)
                for p, s in zip(files, per, strict=True) if s == 0
            }  # fmt: skip
            stored = stored_files(data)
            assert set(stored) == acked  # nothing refused is stored, nothing stored is half-written
            for uid, path in stored.items():
                assert dataset_bytes(path) == dataset_bytes(by_uid[uid]), uid
            assert partial_leftovers(data) == []
            assert len(scp.pool.pids()) == 2 and scp.pool.restarts == 0  # no receiver fell over

            ballast.unlink()  # space returns
            for path in list(stored.values())[:2]:
                path.unlink()
            retry = [p for p in by_uid.values() if sop_of(p)[2] not in acked][:3]
            assert storescu(scp.port, retry, "FILL0") == {sop_of(p)[2] for p in retry}
            for path in retry:
                assert dataset_bytes(stored_files(data)[sop_of(path)[2]]) == dataset_bytes(path)
