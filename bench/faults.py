"""Fault figures of the front door at sizes the tests do not afford, and a soak mode.

Scenarios (each with its own SCP process, ``openmsk scp``, its own DATA_DIR and a private redis-server):

* ``senders``  — 8 concurrent senders (4 dcmtk ``storescu``, 4 pynetdicom) × 300 instances: acknowledged,
  stored and byte-identical counts, throughput.
* ``scp-kill`` — the SCP SIGKILLed mid-stream after 1/3 of a 300-instance series was acknowledged, restarted,
  the rest sent: acknowledged instances lost, incomplete files counted as stored, restart time, jobs queued
  for the series (must be 1).
* ``redis-kill`` — Redis SIGKILLed right after a job was queued, a second series received meanwhile, Redis
  restarted on the same AOF: jobs lost / duplicated, Dramatiq messages, recovery time (restart → outbox empty).
* ``disk-full`` — DATA_DIR on a 64 MB tmpfs (root only; skipped with the reason otherwise): stored before the
  disk filled, refusals and their status, files half-written, recovery once space returns.
* ``fuzz``     — the DICOM mutation fuzzer of ``tests/dicom_fuzz.py`` with ``--fuzz-cases`` cases.

A worker SIGKILLed mid-job (redelivery time, one SEG) and Orthanc down during delivery/archive are measured by
``tests/test_worker_e2e.py`` and ``tests/test_archive_forwarding.py``, which print their figures (``-s``).

    .venv/bin/python bench/faults.py [--only senders,scp-kill] [--instances 300] [--size 128]
    .venv/bin/python bench/faults.py --minutes 10        # soak: steady C-STOREs and the jobs they make

The soak prints the SCP's RSS, its open files, and the queue depth every ``--every`` seconds, then the trend
(least-squares slope per minute) of each: a leak shows as a steady positive slope.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from openmsk.config import Settings, load_settings
from openmsk.jobs import JobStore
from openmsk.managed.process import free_port
from openmsk.managed.redis import ManagedRedis
from tests.dicom_fuzz import mutation_cases, run_cases
from tests.mr_series import write_mr_series
from tests.test_faults import (
    SCPProcess,
    dataset_bytes,
    partial_leftovers,
    pynetdicom_send,
    pynetdicom_statuses,
    sop_of,
    stored_files,
    storescu,
)

Row = dict[str, object]


def node_settings(work: Path, redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": work / "data", "redis_url": redis_url, "scp_host": "127.0.0.1", "scp_port": free_port(),
        "web_port": free_port(), "min_free_disk_mb": 0, "series_quiet_s": 2.0, "series_timeout_s": 30.0,
        **overrides,
    }  # fmt: skip
    Path(values["data_dir"]).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    return load_settings(**values)


def identical(stored: dict[str, Path], sources: dict[str, Path]) -> int:
    return sum(
        1
        for uid, path in stored.items()
        if uid in sources and dataset_bytes(path) == dataset_bytes(sources[uid])
    )


def scenario_senders(work: Path, redis_url: str, args: argparse.Namespace) -> Row:
    settings = node_settings(work, redis_url)
    series = [write_mr_series(work / f"s{n}", args.instances, args.size, args.size, seed=n) for n in range(8)]
    scp = SCPProcess(settings, work / "scp.log").start()
    try:
        start = time.perf_counter()

        def send(n: int) -> set[str]:
            port = settings.scp_port
            if n % 2:
                return pynetdicom_send(port, series[n], f"PYNET{n}")
            return storescu(port, series[n], f"DCMTK{n}")

        with ThreadPoolExecutor(8) as pool:
            acked = set().union(*pool.map(send, range(8)))
        seconds = time.perf_counter() - start
    finally:
        scp.stop()
    sources = {sop_of(p)[2]: p for files in series for p in files}
    stored = stored_files(settings.data_path)
    return {
        "scenario": f"8 senders x {args.instances}",
        "sent": len(sources), "acknowledged": len(acked), "stored": len(stored),
        "identical": identical(stored, sources), "lost": len(acked - set(stored)),
        "figure": f"{len(sources) / seconds:.0f} instances/s",
    }  # fmt: skip


def scenario_scp_kill(work: Path, redis_url: str, args: argparse.Namespace) -> Row:
    settings = node_settings(work, redis_url)
    files = write_mr_series(work / "series", args.instances, args.size, args.size, seed=99)
    sources = {sop_of(p)[2]: p for p in files}
    series_uid = sop_of(files[0])[1]
    scp = SCPProcess(settings, work / "scp1.log").start()
    acked: set[str] = set()
    sender = threading.Thread(target=pynetdicom_send, args=(settings.scp_port, files, "KILLED", acked))
    sender.start()
    while len(acked) < args.instances // 3 and sender.is_alive():
        time.sleep(0.005)
    scp.kill()
    sender.join()
    acknowledged = set(acked)
    on_disk = stored_files(settings.data_path)
    incomplete = len(on_disk) - identical(on_disk, sources)
    restart_at = time.perf_counter()
    restarted = SCPProcess(settings, work / "scp2.log").start()
    restart_s = time.perf_counter() - restart_at
    try:
        leftovers = len(partial_leftovers(settings.data_path))
        rest = [p for p in files if sop_of(p)[2] not in acknowledged]
        storescu(settings.scp_port, rest, "KILLED")
        jobs = JobStore.from_url(redis_url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not [j for j in jobs.list() if j.series_uid == series_uid]:
            time.sleep(0.05)
        time.sleep(settings.series_quiet_s + 1)
        queued = [j for j in jobs.list(limit=200) if j.series_uid == series_uid]
    finally:
        restarted.stop()
    stored = stored_files(settings.data_path)
    return {
        "scenario": f"SCP SIGKILL at {len(acknowledged)}/{args.instances}",
        "sent": len(files), "acknowledged": len(acknowledged), "stored": len(stored),
        "identical": identical(stored, sources), "lost": len(acknowledged - set(on_disk)),
        "figure": f"restart {restart_s:.1f} s, incomplete counted {incomplete}, .partial left {leftovers}, "
                  f"jobs for the series {len(queued)} ({len(queued[0].sop_uids) if queued else 0} instances)",
    }  # fmt: skip


def scenario_redis_kill(work: Path, _redis_url: str, args: argparse.Namespace) -> Row:
    own = ManagedRedis(work / "redis").start()
    servers = [own]
    settings = node_settings(work, own.url)
    first = write_mr_series(work / "a", 20, 32, 32, seed=31)
    second = write_mr_series(work / "b", 20, 32, 32, seed=32)
    uid_a, uid_b = sop_of(first[0])[1], sop_of(second[0])[1]
    scp = SCPProcess(settings, work / "scp.log").start()
    jobs = JobStore.from_url(own.url)
    try:
        storescu(settings.scp_port, first)
        wait(lambda: [j for j in jobs.list() if j.series_uid == uid_a], 60)
        assert own.proc is not None
        own.proc.send_signal(signal.SIGKILL)
        own.proc.wait()
        own.proc = None
        storescu(settings.scp_port, second)
        spool = settings.data_path / "spool"
        wait(lambda: list(spool.glob("*.json")), 30)
        restart_at = time.perf_counter()
        servers.append(ManagedRedis(work / "redis", port=own.port).start())
        wait(lambda: not list(spool.glob("*.json")), 60)
        recovery_s = time.perf_counter() - restart_at
        time.sleep(2)
        found = [j.series_uid for j in jobs.list(limit=100)]
        client = redis.Redis.from_url(own.url)
        messages = sum(client.hlen(f"openmsk:{q}.msgs") for q in ("default", "urgent"))
    finally:
        scp.stop()
        for server in servers:
            server.stop()
    expected = {uid_a, uid_b}
    return {
        "scenario": "Redis SIGKILL + restart",
        "sent": 2, "acknowledged": 2, "stored": len(set(found) & expected), "identical": "-",
        "lost": len(expected - set(found)),
        "figure": f"duplicates {len(found) - len(set(found))}, Dramatiq messages {messages}, "
                  f"restart -> outbox empty {recovery_s:.1f} s",
    }  # fmt: skip


def scenario_disk_full(work: Path, redis_url: str, args: argparse.Namespace) -> Row:
    data = work / "small"
    data.mkdir()
    if os.geteuid() != 0:
        return {"scenario": "disk full", "figure": "skipped: mounting a tmpfs needs root"}
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(data)], capture_output=True
    )
    if mounted.returncode:
        return {"scenario": "disk full", "figure": f"skipped: {mounted.stderr.decode().strip()}"}
    try:
        settings = node_settings(work, redis_url, data_dir=data)
        files = write_mr_series(work / "big", 160, 512, 512, seed=41)  # 512 kB each: 80 MB > 64 MB
        ballast = data / "ballast"
        ballast.write_bytes(b"\0" * (4 << 20))
        scp = SCPProcess(settings, work / "scp.log").start()
        try:
            statuses = pynetdicom_statuses(settings.scp_port, files, "FILLER")
            statuses += [-1] * (len(files) - len(statuses))  # -1: never answered
            sources = {sop_of(p)[2]: p for p in files}
            stored = stored_files(data)
            acked = {sop_of(p)[2] for p, s in zip(files, statuses, strict=True) if s == 0}
            half = len(stored) - identical(stored, sources) + len(partial_leftovers(data))
            ballast.unlink()
            retry = [p for p, s in zip(files, statuses, strict=True) if s != 0][:4]
            start = time.perf_counter()
            recovered = storescu(settings.scp_port, retry, "FILLER")
            recovery_s = time.perf_counter() - start
        finally:
            scp.stop()
    finally:
        subprocess.run(["umount", "-l", str(data)], capture_output=True)
    refusals = sorted({f"0x{s:04X}" for s in statuses if s})
    return {
        "scenario": "disk full (64 MB tmpfs)",
        "sent": len(files), "acknowledged": len(acked), "stored": len(stored), "identical": len(stored) - half,
        "lost": len(acked - set(stored)),
        "figure": f"refused {len(files) - len(acked)} with {','.join(refusals)}, half-written {half}, "
                  f"after freeing 4 MB {len(recovered)}/{len(retry)} stored ({recovery_s:.1f} s)",
    }  # fmt: skip


def scenario_fuzz(work: Path, redis_url: str, args: argparse.Namespace) -> Row:
    settings = node_settings(work, redis_url)
    scp = SCPProcess(settings, work / "scp.log").start()
    try:
        start = time.perf_counter()
        counts, _ = run_cases(
            "127.0.0.1", settings.scp_port, list(mutation_cases(args.seed, args.fuzz_cases))
        )
        seconds = time.perf_counter() - start
        alive = scp.proc is not None and scp.proc.poll() is None
    finally:
        scp.stop()
    return {
        "scenario": f"DICOM fuzz, seed {args.seed}",
        "sent": counts.sent, "acknowledged": counts.sent - counts.crashed, "stored": counts.stored,
        "identical": "-", "lost": "-",
        "figure": f"rejected {counts.rejected}, crashed {counts.crashed}, SCP alive {alive}, "
                  f"{counts.sent / seconds:.0f} cases/s",
    }  # fmt: skip


def wait(check: Callable[[], object], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


SCENARIOS = {
    "senders": scenario_senders,
    "scp-kill": scenario_scp_kill,
    "redis-kill": scenario_redis_kill,
    "disk-full": scenario_disk_full,
    "fuzz": scenario_fuzz,
}
COLUMNS = ("scenario", "sent", "acknowledged", "stored", "identical", "lost")


def print_table(rows: list[Row]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS) + "  figures")
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in COLUMNS) + f"  {row.get('figure', '')}")


# ------------------------------------------------------------------------------------------------- soak


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, value)`` samples, per minute."""
    if len(samples) < 2:
        return 0.0
    xs, ys = [s[0] for s in samples], [s[1] for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def process_figures(pid: int) -> tuple[float, int]:
    """RSS in MB and open file descriptors of a process (from /proc)."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def soak(work: Path, redis_url: str, args: argparse.Namespace) -> int:
    """Steady C-STOREs (a new 20-instance series every ``--every``/2 s) and the jobs they queue."""
    settings = node_settings(work, redis_url, series_quiet_s=1.0)
    scp = SCPProcess(settings, work / "scp.log").start()
    assert scp.proc is not None
    client = redis.Redis.from_url(redis_url)
    stop = threading.Event()
    sent = [0]

    def sender() -> None:
        n = 0
        while not stop.is_set():
            folder = work / f"soak{n % 4}"
            shutil.rmtree(folder, ignore_errors=True)
            files = write_mr_series(folder, 20, args.size, args.size, seed=1000 + n)
            sent[0] += len(storescu(settings.scp_port, files, "SOAK"))
            n += 1
            stop.wait(args.every / 2)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    rss_samples: list[tuple[float, float]] = []
    fd_samples: list[tuple[float, float]] = []
    depth_samples: list[tuple[float, float]] = []
    start = time.monotonic()
    print(f"{'t (s)':>7s} {'RSS MB':>8s} {'open fds':>9s} {'queue':>6s} {'stored':>7s}")
    try:
        while time.monotonic() - start < args.minutes * 60:
            now = time.monotonic() - start
            rss, fds = process_figures(scp.proc.pid)
            depth = sum(client.hlen(f"openmsk:{q}.msgs") for q in ("default", "urgent"))
            client.delete("openmsk:default.msgs", "openmsk:default")  # no worker: the queue is drained here
            rss_samples.append((now, rss))
            fd_samples.append((now, fds))
            depth_samples.append((now, depth))
            print(f"{now:7.0f} {rss:8.1f} {fds:9d} {depth:6d} {sent[0]:7d}", flush=True)
            time.sleep(args.every)
    finally:
        stop.set()
        thread.join(timeout=120)
        scp.stop()
    print(
        f"\ntrend per minute: RSS {slope_per_minute(rss_samples):+.2f} MB, "
        f"open fds {slope_per_minute(fd_samples):+.2f}, queue {slope_per_minute(depth_samples):+.2f}; "
        f"{sent[0]} instances acknowledged in {args.minutes:g} min"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--size", type=int, default=128, help="rows = columns of the instances")
    parser.add_argument("--fuzz-cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, help="soak for this long instead of the scenarios")
    parser.add_argument("--every", type=float, default=10.0, help="soak: seconds between samples")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="openmsk-faults-"))
    try:
        with ManagedRedis(work / "shared-redis") as shared:
            if args.minutes:
                return soak(work / "soak", shared.url, args)
            rows = []
            for name in args.only.split(","):
                folder = work / name
                folder.mkdir()
                redis.Redis.from_url(shared.url).flushdb()
                print(f"running {name} ...", flush=True)
                rows.append(SCENARIOS[name](folder, shared.url, args))
            print()
            print_table(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
