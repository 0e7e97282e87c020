"""Fault invariants of the front door, with real processes: the SCP as ``openmsk scp``, redis-server, dcmtk.

* 8 concurrent senders (storescu and pynetdicom): every acknowledged instance is stored, byte for byte.
* The SCP SIGKILLed mid-stream and restarted: every acknowledged instance is on disk and complete, nothing
  partial counts as stored, and the series (finished by the sender after the restart) is queued once.
* Redis SIGKILLed and restarted: no job lost or duplicated; ``/health`` is not healthy meanwhile.
* Disk full (a tmpfs ``DATA_DIR``): C-STORE answered Out of Resources, nothing half-written, and storing works
  again once space returns.

Covered elsewhere and not repeated here: a worker SIGKILLed mid-job (redelivery < 15 s, exactly one SEG in
Orthanc: ``tests/test_worker_e2e.py``), Orthanc down during delivery (``tests/test_worker_e2e.py``,
``tests/test_delivery_holes.py``) and during archiving (``tests/test_archive_forwarding.py``). Figures at
larger sizes: ``bench/faults.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import redis
from pynetdicom.dsutils import split_dataset

from openmsk.config import Settings
from openmsk.jobs import JobStore
from openmsk.managed.redis import ManagedRedis
from tests.dicom_fuzz import Case, RawStoreClient
from tests.mr_series import write_mr_series
from tests.processes import health, openmsk, settings_env, wait_for

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def echo(port: int) -> bool:
    result = subprocess.run(
        ["echoscu", "-aec", "OPENMSK", "127.0.0.1", str(port)], env=DCMTK_ENV, capture_output=True, timeout=30
    )
    return result.returncode == 0


class SCPProcess:
    """``openmsk scp`` as a child process on ``settings``; started and stopped (or killed) by the test."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings, self.log = settings, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> SCPProcess:
        self.proc = openmsk("scp", settings_env(self.settings), self.log)
        wait_for(lambda: echo(self.settings.scp_port) or self.proc.poll() is not None, 30, "SCP listening")
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def scp_process(settings: Settings, tmp_path: Path) -> Iterator[type[SCPProcess]]:
    started: list[SCPProcess] = []

    class Tracked(SCPProcess):
        def start(self) -> SCPProcess:
            started.append(self)
            return super().start()

    yield Tracked
    for scp in started:
        scp.stop()


def fast(settings: Settings, **overrides: object) -> Settings:
    values = {"min_free_disk_mb": 0, "series_quiet_s": 0.5, "series_timeout_s": 10.0, **overrides}
    return settings.model_copy(update=values)


def dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def sop_of(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def stored_files(data_dir: Path) -> dict[str, Path]:
    """Complete instances under ``incoming/`` by SOP Instance UID (``.partial/`` is not "stored")."""
    incoming = data_dir / "incoming"
    return {p.stem: p for p in incoming.rglob("*.dcm") if ".partial" not in p.relative_to(incoming).parts}


def partial_leftovers(data_dir: Path) -> list[Path]:
    folder = data_dir / "incoming" / ".partial"
    return [p for p in folder.iterdir() if not p.name.startswith("spare.")] if folder.exists() else []


def storescu(port: int, files: list[Path], calling: str = "SENDER") -> set[str]:
    """Send ``files`` on one storescu association; the SOP Instance UIDs it saw acknowledged with Success."""
    result = subprocess.run(
        ["storescu", "-v", "-aet", calling, "-aec", "OPENMSK", "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    acked, output = set(), (result.stdout + result.stderr).splitlines()
    sent = iter(sop_of(f)[2] for f in files)
    for line in output:  # storescu logs one response per request, in order
        if "Received Store Response" in line:
            uid = next(sent)
            if "(Success)" in line:
                acked.add(uid)
    return acked


def file_case(path: Path) -> Case:
    """A DICOM file as a fuzzer case: its data set bytes as stored, on its own SOP class and syntax."""
    meta, offset = split_dataset(path)
    return Case(
        path.name, str(meta.TransferSyntaxUID), path.read_bytes()[offset:],
        str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
    )  # fmt: skip


def pynetdicom_statuses(
    port: int, files: list[Path], calling: str, acked: set[str] | None = None
) -> list[int]:
    """Send ``files`` on one pynetdicom association; the status of each (stops at the first unanswered).

    Acknowledged SOP UIDs are also added to ``acked`` as they come. Sent with :class:`RawStoreClient`: the
    stock ``send_c_store`` loses a fast answer now and then (see ``tests/dicom_fuzz.py``).
    """
    cases = [file_case(p) for p in files]
    client = RawStoreClient("127.0.0.1", port, calling_ae=calling, timeout_s=5)  # a killed SCP never answers
    statuses: list[int] = []
    if not client.open(sorted({(c.sop_class_uid, c.transfer_syntax) for c in cases})):
        return statuses
    try:
        for case in cases:
            status = client.send(case)
            if status is None:
                break
            statuses.append(status)
            if status == 0x0000 and acked is not None:
                acked.add(case.sop_instance_uid)
    finally:
        client.close()
    return statuses


def pynetdicom_send(port: int, files: list[Path], calling: str, acked: set[str] | None = None) -> set[str]:
    """Send ``files`` on one pynetdicom association; the acknowledged SOP UIDs (also added to ``acked``)."""
    acked = set() if acked is None else acked
    pynetdicom_statuses(port, files, calling, acked)
    return acked


def test_eight_concurrent_senders_every_acknowledged_instance_is_stored_as_sent(
    settings: Settings, scp_process: type[SCPProcess], tmp_path: Path
) -> None:
    configured = fast(settings)
    scp = scp_process(configured, tmp_path / "scp.log").start()
    series = [write_mr_series(tmp_path / f"sender{n}", 25, 32, 32, seed=100 + n) for n in range(8)]

    def send(n: int) -> set[str]:
        if n % 2:
            return pynetdicom_send(configured.scp_port, series[n], f"PYNET{n}")
        return storescu(configured.scp_port, series[n], f"DCMTK{n}")

    with ThreadPoolExecutor(8) as pool:
        acknowledged = set().union(*pool.map(send, range(8)))
    sent = {sop_of(p)[2]: p for files in series for p in files}
    stored = stored_files(configured.data_path)
    print(f"\n8 senders x 25: {len(sent)} sent, {len(acknowledged)} acknowledged, {len(stored)} stored")
    assert acknowledged == set(sent)  # nothing refused on a healthy node ...
    assert set(stored) == acknowledged  # ... and what was acknowledged is what is on disk
    for uid, path in stored.items():
        assert dataset_bytes(path) == dataset_bytes(sent[uid]), uid
    assert scp.proc is not None and scp.proc.poll() is None


def test_scp_killed_mid_stream_keeps_what_it_acknowledged_and_queues_the_series_once(
    settings: Settings, scp_process: type[SCPProcess], tmp_path: Path
) -> None:
    configured = fast(settings, series_quiet_s=2.0)
    files = write_mr_series(tmp_path / "series", 60, 64, 64, seed=7)
    study_uid, series_uid, _ = sop_of(files[0])
    scp = scp_process(configured, tmp_path / "scp1.log").start()
    acked: set[str] = set()
    sender = threading.Thread(target=pynetdicom_send, args=(configured.scp_port, files, "KILLTEST", acked))
    sender.start()
    wait_for(lambda: len(acked) >= 20, 60, "20 instances acknowledged")
    scp.kill()  # mid-stream: the sender is still sending
    sender.join(timeout=60)
    acknowledged = set(acked)
    assert 20 <= len(acknowledged) < len(files), len(acknowledged)

    by_uid = {sop_of(p)[2]: p for p in files}
    stored = stored_files(configured.data_path)
    assert acknowledged <= set(stored)  # every acknowledged instance survived the kill ...
    for uid, path in stored.items():  # ... and everything in the series folder is complete
        assert dataset_bytes(path) == dataset_bytes(by_uid[uid]), uid

    # Restart: leftovers of the instance in flight are recovered or deleted, never shown as stored.
    restarted = scp_process(configured, tmp_path / "scp2.log").start()
    assert partial_leftovers(configured.data_path) == []
    for uid, path in stored_files(configured.data_path).items():
        assert dataset_bytes(path) == dataset_bytes(by_uid[uid]), uid
    # The sender finishes the series after the restart (what it did not hear acknowledged).
    rest = [p for p in files if sop_of(p)[2] not in acknowledged]
    assert storescu(configured.scp_port, rest, "KILLTEST") == {sop_of(p)[2] for p in rest}

    jobs = JobStore.from_url(str(configured.redis_url))
    found = wait_for(lambda: [j for j in jobs.list() if j.series_uid == series_uid], 30, "series queued")
    time.sleep(configured.series_quiet_s + 1)  # a second (partial or repeated) job would show up by now
    found = [j for j in jobs.list(limit=100) if j.series_uid == series_uid]
    assert len(found) == 1, [(j.id, len(j.sop_uids)) for j in found]
    assert sorted(found[0].sop_uids) == sorted(by_uid) and found[0].study_uid == study_uid
    assert restarted.proc is not None and restarted.proc.poll() is None


def test_redis_killed_and_restarted_loses_and_duplicates_no_job(
    settings: Settings, scp_process: type[SCPProcess], tmp_path: Path
) -> None:
    own = ManagedRedis(tmp_path / "redis").start()  # AOF on, like the node's own
    servers, web = [own], None
    try:
        configured = fast(settings, redis_url=own.url)
        scp = scp_process(configured, tmp_path / "scp.log").start()
        web = openmsk("web", settings_env(configured), tmp_path / "web.log")
        wait_for(lambda: health(configured.web_port)[1]["redis"] == "available", 30, "web up")
        jobs = JobStore.from_url(own.url)
        first = write_mr_series(tmp_path / "a", 20, 16, 16, seed=11)  # the knee rule wants >= 20
        second = write_mr_series(tmp_path / "b", 20, 16, 16, seed=12)
        series_a, series_b = sop_of(first[0])[1], sop_of(second[0])[1]

        assert len(storescu(configured.scp_port, first)) == 20
        wait_for(lambda: [j for j in jobs.list() if j.series_uid == series_a], 30, "first job queued")
        assert own.proc is not None
        own.proc.send_signal(signal.SIGKILL)  # right after the job was acknowledged by Redis
        own.proc.wait(timeout=10)
        own.proc = None

        code, report = wait_for(
            lambda: (r := health(configured.web_port))[1]["redis"] != "available" and r, 15, "health sees it"
        )
        assert code == 503 and report["status"] == "degraded", report  # openmsk/health.py: Redis down
        # The SCP keeps receiving; the second series' job waits in the outbox on disk.
        assert len(storescu(configured.scp_port, second)) == 20
        spool = configured.data_path / "spool"
        wait_for(lambda: list(spool.glob("*.json")), 20, "job waiting in the outbox")

        servers.append(ManagedRedis(tmp_path / "redis", port=own.port).start())  # same data, same port
        wait_for(lambda: [j for j in jobs.list() if j.series_uid == series_b], 30, "second job queued")
        wait_for(lambda: not list(spool.glob("*.json")), 10, "outbox drained")
        time.sleep(1.5)  # time for a duplicate from a retried drain
        found = sorted(j.series_uid for j in jobs.list(limit=100))
        assert found == sorted([series_a, series_b])  # both, once each
        client = redis.Redis.from_url(own.url)
        queued = sum(client.hlen(f"openmsk:{name}.msgs") for name in ("default", "urgent"))  # Dramatiq's
        assert queued == 2, queued  # one message per job (no worker runs here)
        assert health(configured.web_port)[1]["redis"] == "available"
        assert scp.proc is not None and scp.proc.poll() is None
    finally:
        if web is not None:
            web.terminate()
            web.wait(timeout=15)
        for server in servers:
            server.stop()


@contextmanager
def small_file_system(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``folder`` (created) for the test, unmounted after it.

    The test is skipped, with the reason printed, only where mounting is impossible (not root, or the kernel
    refuses tmpfs): the issue's disk-full figures allow that, and every package the test needs is installed
    either way.
    """
    folder.mkdir()
    reason = None
    if os.geteuid() != 0:
        reason = "mounting a small file system needs root"
    else:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            reason = f"mount -t tmpfs failed: {result.stderr.strip()}"
    if reason is not None:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_disk_full_answers_out_of_resources_writes_nothing_half_and_recovers(
    settings: Settings, scp_process: type[SCPProcess], tmp_path: Path
) -> None:
    with small_file_system(tmp_path / "small", "8m") as data:
        scp = None
        try:
            configured = fast(settings, data_dir=data)
            scp = scp_process(configured, tmp_path / "scp.log").start()
            files = write_mr_series(tmp_path / "big", 40, 512, 256, seed=21)  # 256 kB each: 10 MB > 8 MB
            ballast = data / "ballast"
            ballast.write_bytes(b"\0" * (1 << 20))  # 1 MB to free later
            statuses = pynetdicom_statuses(configured.scp_port, files, "FILLER")
            assert len(statuses) == len(files)  # every C-STORE answered
            full = [s for s in statuses if s != 0]
            print(f"\n{statuses.count(0)} stored, then {len(full)} refused: {sorted({hex(s) for s in full})}")
            assert statuses.count(0) > 0 and full, statuses
            assert all(s >> 8 == 0xA7 for s in full)  # Out of Resources, nothing else
            first_refused = statuses.index(full[0])
            assert all(s == 0 for s in statuses[:first_refused])
            by_uid = {sop_of(p)[2]: p for p in files}
            stored = stored_files(data)
            acked = {sop_of(p)[2] for p, s in zip(files, statuses, strict=True) if s == 0}
            assert set(stored) == acked  # nothing refused is stored, nothing stored is half-written
            for uid, path in stored.items():
                assert dataset_bytes(path) == dataset_bytes(by_uid[uid])
            assert partial_leftovers(data) == []

            ballast.unlink()  # space returns
            for path in list(stored.values())[:2]:
                path.unlink()
            retry = [p for p, s in zip(files, statuses, strict=True) if s != 0][:3]
            assert storescu(configured.scp_port, retry, "FILLER") == {sop_of(p)[2] for p in retry}
            for path in retry:
                assert dataset_bytes(stored_files(data)[sop_of(path)[2]]) == dataset_bytes(path)
        finally:
            if scp is not None:
                scp.stop()
