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
    .venv/bin/python bench/faults.py --minutes 10 --every 15   # soak: SCP, web and worker under steady load

The soak runs the node's own processes against the bench's private Redis on one DATA_DIR: ``openmsk scp``,
``openmsk web`` and one ``openmsk worker`` (OPENMSK_DEVICE=cpu), with a routing rule that sends every MR series
to the fastest shipped model (dosma_2d); no Orthanc, no destinations. The load runs at a fixed rate: every
``--load-every`` seconds a new small phantom series by storescu, and half a period later an upload of another
one through ``POST /api/jobs`` (the upload page's endpoint, with an API token, ``model=dosma_2d``). Every
``--every`` seconds one row: RSS (MB) and open fds of each process tree (the worker's includes its analysis
process), Dramatiq messages waiting, jobs done / failed / in flight, instances acknowledged, uploads accepted.
At the end the least-squares trend per minute of every column after ``--warm-up-s``, a verdict per process
(growth: slope at or above ``--max-rss-slope`` MB/min or ``--max-fd-slope`` fds/min *and* a floor that rose
from the first to the last third of the samples) and the jobs' fate; exit status 1 when a job failed, an
upload was refused, a series was not fully acknowledged, or a sent series or an accepted upload did not end
as a done job within ``--drain-s`` after the load stopped. The verdicts are printed, not part of the status.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
import requests

from openmsk.config import Settings, load_settings
from openmsk.jobs import Job, JobState, JobStore
from openmsk.managed.process import free_port
from openmsk.managed.redis import ManagedRedis
from openmsk.phantom import generate, write_series
from openmsk.queue import DELIVER_QUEUE, NAMESPACE, QUEUES
from tests.dicom_fuzz import mutation_cases, run_cases
from tests.mr_series import write_mr_series
from tests.processes import descendants, health, openmsk, settings_env, wait_for
from tests.test_faults import (
    SCPProcess,
    dataset_bytes,
    echo,
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

SOAK_MODEL = "dosma_2d"  # the fastest shipped model: the worker keeps up with the load on a laptop's CPU
SOAK_RULES = f"""# bench/faults.py soak: every MR series to {SOAK_MODEL}, results nowhere, nothing archived
[[rules]]
name = "soak"
modality = "MR"
model = "{SOAK_MODEL}"
archive = []
"""
IN_FLIGHT = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING, JobState.DELIVERING)
ROLES = ("scp", "web", "worker")
WORKER_OWN = "worker process MB"  # sampled, not printed as a column: the worker tree's RSS less its children


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, value)`` samples, per minute."""
    if len(samples) < 2:
        return 0.0
    xs, ys = [s[0] for s in samples], [s[1] for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def process_figures(pid: int, tree: bool = True) -> tuple[float, int]:
    """RSS in MB and open file descriptors of a process and (``tree``) every process below it (from /proc).

    The tree, not the pid alone: the worker's analysis runs in a child process it spawns once and reuses."""
    rss, fds = 0.0, 0
    for member in (pid, *(descendants(pid) if tree else ())):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
            fds += len(os.listdir(f"/proc/{member}/fd"))
        except OSError:  # gone between the listing and the read
            continue
    return rss, fds


def queue_depth(client: redis.Redis) -> int:
    """Dramatiq messages waiting in the node's queues (fetched but unfinished ones are not counted)."""
    return sum(int(client.llen(f"{NAMESPACE}:{q}")) for q in (*QUEUES, DELIVER_QUEUE))


def series_uid_of(folder: Path) -> str:
    return sop_of(next(folder.iterdir()))[1]


def phantom_dicom(folder: Path, seed: int) -> Path:
    """A small sagittal phantom (40 instances of 256 x 256 by default): a knee the model segments."""
    shutil.rmtree(folder, ignore_errors=True)
    write_series(generate(seed=seed, size="small", orientation="sagittal"), folder)
    return folder / "dicom"


def zip_of(dicom: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(dicom.iterdir()):
            archive.write(path, arcname=f"study/series/{path.stem}")
    return buffer.getvalue()


class SoakNode:
    """The node's own processes on one DATA_DIR and a private Redis: ``openmsk scp``, ``openmsk web`` and one
    ``openmsk worker`` (CPU). The SCP routes every MR series to :data:`SOAK_MODEL`; no Orthanc, no
    destinations."""

    def __init__(self, work: Path, redis_url: str) -> None:
        rules = work / "routing.toml"
        work.mkdir(parents=True, exist_ok=True)
        rules.write_text(SOAK_RULES)
        self.token = secrets.token_hex(16)
        self.settings = node_settings(
            work, redis_url, series_quiet_s=1.0, routing_rules=rules, api_tokens=[self.token]
        )
        self.work = work
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> SoakNode:
        env = settings_env(self.settings)
        for role in ROLES:
            extra = {"OPENMSK_DEVICE": "cpu"} if role == "worker" else {}
            self.procs[role] = openmsk(role, env | extra, self.work / f"{role}.log")
        web = f"http://127.0.0.1:{self.settings.web_port}"
        try:
            wait_for(lambda: self.alive() and echo(self.settings.scp_port), 60, "SCP listening")
            wait_for(lambda: self.alive() and requests.get(f"{web}/login", timeout=5).ok, 60, "web answering")
            wait_for(
                lambda: self.alive() and health(self.settings.web_port)[1].get("workers"), 120, "worker up"
            )
        except AssertionError:
            for role in ROLES:
                print(f"--- {role}.log\n{(self.work / f'{role}.log').read_text()[-1500:]}", file=sys.stderr)
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        dead = [role for role, proc in self.procs.items() if proc.poll() is not None]
        if dead:
            raise AssertionError(f"{', '.join(dead)} exited")
        return True

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


class SoakLoad:
    """Steady load at a fixed rate: a new phantom series by storescu every ``every`` s and, half a period
    later, an upload of another one through ``POST /api/jobs`` (the upload page's endpoint, with the API token
    and ``model``). Synthetic phantoms only; the UIDs and counts are kept, nothing else is printed."""

    def __init__(self, node: SoakNode, work: Path, every: float) -> None:
        self.node, self.work, self.every = node, work, every
        self.stop = threading.Event()
        self.acked = 0
        self.series_sent: list[str] = []  # series UIDs storescu sent completely
        self.short: list[str] = []  # series UIDs with instances not acknowledged
        self.uploads: list[str] = []  # job ids of accepted uploads
        self.refused: list[int] = []  # HTTP statuses of refused uploads
        self.api = requests.Session()
        self.api.headers["Authorization"] = f"Bearer {node.token}"
        self.threads = [
            threading.Thread(target=self._loop, args=(self._send, 0.0), daemon=True),
            threading.Thread(target=self._loop, args=(self._upload, every / 2), daemon=True),
        ]

    def start(self) -> SoakLoad:
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=180)

    def _loop(self, action: Callable[[int], None], offset: float) -> None:
        due = time.monotonic() + offset
        n = 0
        while not self.stop.wait(max(0.0, due - time.monotonic())):
            action(n)
            n += 1
            due += self.every  # a fixed rate: a slow send does not slow the load down, it bunches

    def _send(self, n: int) -> None:
        dicom = phantom_dicom(self.work / "send", 10_000 + n)
        files = sorted(dicom.iterdir())
        acked = storescu(self.node.settings.scp_port, files, "SOAK")
        self.acked += len(acked)
        (self.series_sent if len(acked) == len(files) else self.short).append(series_uid_of(dicom))

    def _upload(self, n: int) -> None:
        body = zip_of(phantom_dicom(self.work / "upload", 20_000 + n))
        response = self.api.post(
            f"http://127.0.0.1:{self.node.settings.web_port}/api/jobs",
            files=[("file", ("knee.zip", body, "application/zip"))],
            data={"model": SOAK_MODEL},
            timeout=120,
        )
        if response.status_code == 202:
            self.uploads.append(response.json()["id"])
        else:
            self.refused.append(response.status_code)


SOAK_COLUMNS = (
    *(f"{role} {what}" for role in ROLES for what in ("MB", "fds")),
    "queue", "done", "failed", "in flight", "acked", "uploads",
)  # fmt: skip


def soak(work: Path, redis_url: str, args: argparse.Namespace) -> int:
    """The node's SCP, web and worker under steady C-STOREs and uploads; their RSS and open files over time.

    Exit status 1 when a job failed, an upload was refused, or a sent series or an accepted upload never
    became a finished job."""
    node = SoakNode(work, redis_url).start()
    jobs = JobStore.from_url(redis_url)
    client = redis.Redis.from_url(redis_url)
    load = SoakLoad(node, work, args.load_every).start()
    samples: dict[str, list[tuple[float, float]]] = {c: [] for c in (*SOAK_COLUMNS, WORKER_OWN)}
    widths = [max(7, len(c)) for c in SOAK_COLUMNS]
    print(
        f"soak: {args.minutes:g} min; a {SOAK_MODEL} series by storescu and an upload each every "
        f"{args.load_every:g} s (one job per {args.load_every / 2:g} s); RSS and fds of each process tree"
    )
    print(f"{'t (s)':>6s} " + " ".join(c.rjust(w) for c, w in zip(SOAK_COLUMNS, widths, strict=True)))
    start = time.monotonic()
    try:
        while True:
            now = time.monotonic() - start
            node.alive()
            counts = jobs.counts_by_state()
            row: list[float] = []
            for role in ROLES:
                row.extend(process_figures(node.procs[role].pid))
            row += [
                queue_depth(client), counts["done"], counts["failed"],
                sum(counts[s.value] for s in IN_FLIGHT), load.acked, len(load.uploads),
            ]  # fmt: skip
            for column, value in zip(SOAK_COLUMNS, row, strict=True):
                samples[column].append((now, value))
            samples[WORKER_OWN].append((now, process_figures(node.procs["worker"].pid, tree=False)[0]))
            cells = [f"{v:{w}.1f}" if c.endswith("MB") else f"{v:{w}d}" for c, v, w in zip(
                SOAK_COLUMNS, row, widths, strict=True)]  # fmt: skip
            print(f"{now:6.0f} " + " ".join(cells), flush=True)
            if now >= args.minutes * 60:
                break
            time.sleep(max(0.0, args.every - (time.monotonic() - start - now)))
        load.finish()
        sent = len(load.series_sent) + len(load.short)
        deadline = time.monotonic() + args.drain_s
        while time.monotonic() < deadline and not drained(jobs, load):
            node.alive()
            time.sleep(1)
        drain_s = args.drain_s - max(0.0, deadline - time.monotonic())
        final = jobs.list(limit=10 * (sent + len(load.uploads)) + 100)
    finally:
        load.finish()
        node.stop()
    return soak_verdict(samples, final, load, args, drain_s)


def drained(jobs: JobStore, load: SoakLoad) -> bool:
    listed = {job.series_uid: job for job in jobs.list(limit=10 * len(load.series_sent) + 100)}
    if not all(uid in listed for uid in load.series_sent):
        return False
    return not sum(jobs.count(state) for state in IN_FLIGHT)


def floor_rise(samples: list[tuple[float, float]]) -> float:
    """The lowest value of the last third of the samples less the lowest of the first third.

    A leak lifts the floor; an association or a job under way at a sample lifts single values only, which can
    tilt a short fit (the SCP's fds are 14 or 16 as a sample meets a sender or not)."""
    third = max(1, len(samples) // 3)
    return min(v for _, v in samples[-third:]) - min(v for _, v in samples[:third]) if samples else 0.0


def soak_verdict(
    samples: dict[str, list[tuple[float, float]]],
    final: list[Job],
    load: SoakLoad,
    args: argparse.Namespace,
    drain_s: float,
) -> int:
    warm = [t for t, _ in samples["queue"] if t >= args.warm_up_s]
    steady = {c: [s for s in samples[c] if s[0] >= args.warm_up_s] for c in samples}
    if len(warm) < 3:
        print(f"\nfewer than 3 samples after the {args.warm_up_s:g} s warm-up: no trend (soak longer)")
        steady = samples
    print(f"\ntrend per minute after a {args.warm_up_s:g} s warm-up (least squares over {len(steady['queue'])}"
          " samples):")  # fmt: skip
    print("       " + " ".join(f"{slope_per_minute(steady[c]):+{max(7, len(c))}.2f}" for c in SOAK_COLUMNS))
    for role in ROLES:
        rss, fds = slope_per_minute(steady[f"{role} MB"]), slope_per_minute(steady[f"{role} fds"])
        rss_floor, fds_floor = floor_rise(steady[f"{role} MB"]), floor_rise(steady[f"{role} fds"])
        growth = (rss >= args.max_rss_slope and rss_floor > 0) or (fds >= args.max_fd_slope and fds_floor > 0)
        print(
            f"  {role:6s} {'GROWTH' if growth else 'no growth'}: RSS {rss:+.2f} MB/min "
            f"(limit {args.max_rss_slope:g}; floor {rss_floor:+.1f} MB), open fds {fds:+.2f}/min "
            f"(limit {args.max_fd_slope:g}; floor {fds_floor:+.0f}); RSS over the last half "
            f"{slope_per_minute(steady[f'{role} MB'][len(steady[f'{role} MB']) // 2 :]):+.2f} MB/min"
        )
    own = steady[WORKER_OWN]
    if own:
        print(
            f"         the worker process alone (its analysis process left out): {own[0][1]:.1f} -> "
            f"{own[-1][1]:.1f} MB, {slope_per_minute(own):+.2f} MB/min, floor {floor_rise(own):+.1f} MB"
        )
    depth = slope_per_minute(steady["queue"])
    print(f"  queue  {'GROWING: the load outruns the worker' if depth >= 1 else 'steady'}: {depth:+.2f}/min")
    by_series = {job.series_uid: job for job in final if job.source == "scp"}
    by_id = {job.id: job for job in final}
    never = [uid for uid in load.series_sent if uid not in by_series]
    uploads = [by_id.get(i) for i in load.uploads]
    mine = [by_series[uid] for uid in load.series_sent if uid in by_series] + [j for j in uploads if j]
    states = Counter(job.state.value for job in mine)
    failed = [job for job in mine if job.state is JobState.FAILED]
    print(
        f"  jobs   {len(load.series_sent)} series sent ({load.acked} instances acknowledged, "
        f"{len(load.short)} series short), {len(load.uploads)} uploads accepted ({len(load.refused)} refused"
        f"{': ' + ','.join(map(str, sorted(set(load.refused)))) if load.refused else ''}); "
        f"their jobs {dict(states)}; sent but never a job {len(never) + uploads.count(None)}; "
        f"drained {drain_s:.0f} s after the load stopped"
    )
    for job in failed[:5]:
        print(f"  failed {job.id}: {job.error.code.value if job.error else '?'}")
    done = [job.state_times for job in mine if job.state is JobState.DONE]
    if done:
        run = [t["done"] - t["running"] for t in done if "running" in t and "done" in t]
        wait = [t["done"] - min(t.values()) for t in done if "done" in t]
        print(
            f"  time   running -> done median {statistics.median(run):.1f} s (max {max(run):.1f}); "
            f"received -> done median {statistics.median(wait):.1f} s (max {max(wait):.1f})"
        )
    bad = failed or never or None in uploads or load.refused or load.short or states["done"] != len(mine)
    return 1 if bad else 0


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
    parser.add_argument(
        "--load-every", type=float, default=15.0,
        help="soak: seconds between two series sent by storescu (and between two uploads, half a period apart)",
    )  # fmt: skip
    parser.add_argument("--warm-up-s", type=float, default=60.0, help="soak: samples left out of the trend")
    parser.add_argument("--drain-s", type=float, default=180.0, help="soak: wait for the last jobs this long")
    parser.add_argument("--max-rss-slope", type=float, default=1.0, help="soak: MB/min counted as growth")
    parser.add_argument("--max-fd-slope", type=float, default=0.5, help="soak: fds/min counted as growth")
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
