"""Ingest speed of the node's SCP against dcmtk's ``storescp``, and how fast a received series becomes a job.

The same instances (default 500 × 512×512 16-bit MR, one 3D knee series) are sent with dcmtk ``storescu`` (one
association, like a scanner) to the node's SCP (``python -m scp``, its own process, as in production) and to
``storescp`` writing to the same disk, alternating, several rounds; both peers run with ``TCP_NODELAY=1``.
Printed: instances/s and MB/s of each (median round), the ratio node/storescp (target ≥ 0.7; a plain
pynetdicom handler measures ~0.25 here), and the completion latency: storescu's exit (last instance
acknowledged, association released) → the job is QUEUED in Redis, which includes ``OPENMSK_SERIES_QUIET_S``
(2 s by default).

Each round also sends the series with storescu to an Orthanc of its own (the Debian package, its defaults:
SQLite index, storage synced before it answers), emptied through its REST API first, as a second baseline:
Orthanc's own durable ingest, the first hop a site runs today (``--no-orthanc`` skips it).

A second run per round sends the same instances over ``--senders`` (default 4) concurrent associations to each
(same total); ``--legacy`` adds an in-process node SCP with the old writes (empty spares, one fsync per
instance) to the same rounds, for an A/B under the same machine load.

Mind the difference in work: the node makes every instance durable before it answers; storescp does not.
Measured on the 2-core development VM (ext4 on virtio, shared with other jobs, so ±30 % between runs): one fsync
of a new 512 kB file costs 5-11 ms; an fdatasync over pre-written blocks 1.4-2.8 ms (hence the pre-written
spares); concurrent fsyncs of several associations already share ext4 journal commits (4 threads: 550-1950
files/s), and one ``syncfs`` per batch of waiting files ("group commit") was slower (270-1380 files/s), so the
node does not do that.

    .venv/bin/python bench/ingest.py [--instances 500] [--rounds 3] [--senders 4] [--legacy] [--profile]
        [--no-orthanc] [--processes N]

``--processes N`` (N > 1) runs a second node SCP with ``OPENMSK_SCP_PROCESSES=N`` (N receiver processes on
one port) in the same rounds, the two nodes taking turns at going first, and prints its ratios beside those of
the one-process node.

``--profile`` runs the node SCP inside this process instead, under cProfile (every thread), and prints where
the time goes; ``--no-fsync`` (diagnostic only) runs it in-process without its fsync, to separate the disk's
share from the code's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openmsk.jobs import JobStore
from openmsk.managed.orthanc import ManagedOrthanc, orthanc_binary
from openmsk.managed.process import free_port, spawn, stop, wait_until
from openmsk.managed.redis import ManagedRedis

ENV = {**os.environ, "TCP_NODELAY": "1"}


class ThreadProfiler:
    """cProfile for the DUL threads (one per association) started after :meth:`install`.

    With the SCP's fast path every C-STORE is served in its association's DUL thread, so that thread's time is
    the node's time per instance; the association threads only idle.
    """

    CATEGORIES = (
        ("waiting for the sender (select)", ("select.select", "dul_wait", "sleep")),
        ("fsync", ("posix.fsync", "fdatasync")),
        ("rename", ("posix.rename",)),
        ("write (page cache)", ("writev",)),
        ("open/close file (spares are made ahead)", ("posix.open", "posix.close")),
        ("crc32 of the file", ("crc32",)),
        ("header walk", ("scp/storage.py:1", "scp/storage.py:2", "_Walker")),
        ("socket receive", ("recv_into", "'recv'")),
        ("socket send", ("'send'", "sendall")),
        ("pynetdicom (PDU reads, state machine)", ("pynetdicom/",)),
        ("node fast path + store (Python)", ("scp/",)),
    )

    def __init__(self) -> None:
        self.profiles: list = []

    def install(self) -> None:
        import cProfile
        import threading

        profiles = self.profiles
        original = threading.Thread.run

        def run(thread: threading.Thread) -> None:
            if type(thread).__name__ != "DULServiceProvider":
                original(thread)
                return
            profile = cProfile.Profile()
            profiles.append(profile)
            profile.enable()
            try:
                original(thread)
            finally:
                profile.disable()

        threading.Thread.run = run  # type: ignore[method-assign]

    def report(self, instances: int) -> None:
        import pstats

        stats = None
        for profile in self.profiles:
            try:
                stats = pstats.Stats(profile) if stats is None else stats.add(profile)
            except TypeError:  # a thread that never ran anything
                continue
        if stats is None:
            return
        totals: dict[str, float] = {}
        for (filename, line, name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            where = f"{filename}:{line}:{name}"
            label = next((lab for lab, keys in self.CATEGORIES if any(k in where for k in keys)), "other")
            totals[label] = totals.get(label, 0.0) + tottime
        grand = sum(totals.values())
        print(
            f"\nDUL threads (they serve every C-STORE), all rounds, ms per instance ({instances} instances):"
        )
        for label, seconds in sorted(totals.items(), key=lambda item: -item[1]):
            print(f"  {1000 * seconds / instances:7.2f} ms  {100 * seconds / grand:5.1f} %  {label}")
        print("(cProfile inflates the Python parts; the system calls are measured as they are)")
        print("\ntop functions by own time:")
        stats.sort_stats("tottime").print_stats(15)


def make_instances(folder: Path, count: int, size: int) -> int:
    """Write ``count`` instances of one 3D knee MR series; returns the total bytes."""
    from tests.mr_series import write_mr_series

    paths = write_mr_series(folder, count, size, size, description="PD SPACE SAG KNEE")
    return sum(p.stat().st_size for p in paths)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def send(folder: Path, port: int, called_ae: str) -> float:
    """One storescu association with every file of ``folder``; returns the wall time in seconds."""
    argv = ["storescu", "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port), str(folder), "+sd"]
    start = time.perf_counter()
    subprocess.run(argv, env=ENV, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def empty_orthanc(orthanc: ManagedOrthanc) -> None:
    """Delete every patient Orthanc holds (its REST API), so that each round stores the series anew."""
    import requests

    auth = (orthanc.user, orthanc.password)
    for patient in requests.get(f"{orthanc.url}/patients", auth=auth, timeout=30).json():
        requests.delete(f"{orthanc.url}/patients/{patient}", auth=auth, timeout=60).raise_for_status()


def send_parallel(folders: list[Path], port: int, called_ae: str) -> float:
    """One storescu association per folder, all at once; returns the wall time until the last one ends."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(folders)) as pool:
        list(pool.map(lambda folder: send(folder, port, called_ae), folders))
    return time.perf_counter() - start


def split(source: Path, parts: int) -> list[Path]:
    """Hard links of ``source``'s files dealt round-robin into ``parts`` folders (same instances, same bytes)."""
    folders = [source.parent / f"{source.name}-part{n}" for n in range(parts)]
    for folder in folders:
        folder.mkdir()
    for index, path in enumerate(sorted(source.iterdir())):
        os.link(path, folders[index % parts] / path.name)
    return folders


def wait_for_job(store: JobStore, timeout_s: float = 60.0) -> float | None:
    """Wall-clock time at which the first job reached QUEUED (None: none within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in store.list(limit=5):
            if "queued" in job.state_times:
                return job.state_times["queued"]
        time.sleep(0.005)
    return None


def clear_incoming(node_data: Path) -> None:
    for path in (node_data / "incoming").rglob("*.dcm"):
        path.unlink()


def node_env(data_dir: Path, redis_url: str, port: int, processes: int = 1) -> dict[str, str]:
    return {
        **ENV,
        "OPENMSK_SCP_PROCESSES": str(processes),
        "OPENMSK_DATA_DIR": str(data_dir),
        "OPENMSK_REDIS_URL": redis_url,
        "OPENMSK_SCP_HOST": "127.0.0.1",
        "OPENMSK_SCP_PORT": str(port),
        "OPENMSK_MIN_FREE_DISK_MB": "0",
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each instance")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--senders", type=int, default=4, help="concurrent associations of the second run (1: skip it)"
    )
    parser.add_argument("--profile", action="store_true", help="run the node SCP in-process under cProfile")
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="diagnostic: run the node SCP in-process without its fsync (never how the node runs)",
    )
    parser.add_argument(
        "--legacy",
        action="store_true",
        help="also time an in-process node SCP with the old writes (empty spares, one fsync each), side by side",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="also time a node with this many receiver processes (OPENMSK_SCP_PROCESSES), same rounds",
    )
    parser.add_argument("--workdir", type=Path, help="where to put data (default: a temporary folder)")
    parser.add_argument(
        "--no-orthanc", action="store_true", help="skip the storescu -> Orthanc rounds (its durable ingest)"
    )
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"bench/ingest.py: dcmtk's {tool} is not installed", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="openmsk-ingest-", dir=args.workdir))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    source = work / "source"
    total_bytes = make_instances(source, args.instances, args.size)
    mb = total_bytes / 1e6
    print(
        f"{args.instances} instances, {args.size}×{args.size} 16-bit, {mb:.0f} MB in one series", flush=True
    )

    with ManagedRedis(work / "redis") as redis_server:
        store = JobStore.from_url(redis_server.url)
        node_port, dcmtk_port = free_port(), free_port()
        node_data = work / "node"
        dcmtk_out = work / "storescp"
        dcmtk_out.mkdir()
        storescp = spawn(
            ["storescp", "-od", str(dcmtk_out), str(dcmtk_port)], env=ENV, log=work / "storescp.log"
        )
        profiler = None
        node = None
        if args.profile or args.no_fsync:
            from openmsk.config import load_settings
            from scp.server import StorageSCP

            profiler = ThreadProfiler() if args.profile else None
            settings = load_settings(
                data_dir=node_data, redis_url=redis_server.url, scp_host="127.0.0.1", scp_port=node_port,
                min_free_disk_mb=0,
            )  # fmt: skip
            if profiler is not None:
                profiler.install()
            node = StorageSCP(settings).start()
            node.store.fsync = not args.no_fsync
        else:
            node_proc = spawn(
                [sys.executable, "-m", "scp"],
                env=node_env(node_data, redis_server.url, node_port),
                log=work / "node.log",
                cwd=Path(__file__).resolve().parents[1],
            )
        multi_proc = None
        multi_port = free_port()
        multi_data = work / "node-multi"
        if args.processes > 1:
            multi_proc = spawn(
                [sys.executable, "-m", "scp"],
                # its own Redis database: the completion latency reads the first node's job
                env=node_env(multi_data, redis_server.url[:-1] + "1", multi_port, args.processes),
                log=work / "node-multi.log",
                cwd=Path(__file__).resolve().parents[1],
            )
        legacy = None
        if args.legacy:
            from openmsk.config import load_settings
            from scp.server import StorageSCP

            legacy_port = free_port()
            legacy_settings = load_settings(
                data_dir=work / "legacy", redis_url=redis_server.url, scp_host="127.0.0.1",
                scp_port=legacy_port, min_free_disk_mb=0,
            )  # fmt: skip
            legacy = StorageSCP(legacy_settings).start()
            legacy.store.prewrite = False
        orthanc = None
        if not args.no_orthanc and orthanc_binary() is not None:
            # Orthanc's own ingest (its defaults: SQLite index, files synced before the answer) as a second
            # baseline: what a site runs as its first hop today.
            orthanc = ManagedOrthanc(
                data_dir=work / "orthanc", http_port=free_port(), dicom_port=free_port(), user="bench",
                password="bench",
            ).start()  # fmt: skip
        try:
            wait_until(lambda: port_open(dcmtk_port), 15, "storescp")
            wait_until(lambda: port_open(node_port), 30, "node SCP")
            if multi_proc is not None:
                wait_until(lambda: port_open(multi_port), 60, "node SCP with receiver processes")
            multi = f"node p{args.processes}"
            parts = split(source, args.senders) if args.senders > 1 else []
            times: dict[str, list[float]] = {"node": [], "storescp": [], "node xN": [], "storescp xN": []}
            latency = None
            for round_index in range(args.rounds):
                shutil.rmtree(dcmtk_out, ignore_errors=True)
                dcmtk_out.mkdir()
                clear_incoming(node_data)  # both start each round on an empty folder
                times["storescp"].append(send(source, dcmtk_port, "ANY-SCP"))
                nodes = [("node", node_port, node_data)]
                if multi_proc is not None:  # take turns at going first
                    nodes.insert(round_index % 2, (multi, multi_port, multi_data))
                for name, port, data in nodes:
                    clear_incoming(data)
                    times.setdefault(name, []).append(send(source, port, "OPENMSK"))
                    if name == "node":
                        acked = time.time()
                if orthanc is not None:
                    empty_orthanc(orthanc)  # a resent instance it already has would be cheaper
                    times.setdefault("orthanc", []).append(send(source, orthanc.dicom_port, orthanc.aet))
                if legacy is not None:
                    clear_incoming(work / "legacy")
                    times.setdefault("legacy", []).append(send(source, legacy.port, "OPENMSK"))
                if round_index == 0:  # later rounds resend the same series: idempotent, no new job
                    queued = wait_for_job(store)
                    latency = None if queued is None else queued - acked
                line = f"round {round_index + 1}: " + ", ".join(
                    f"{name} {times[name][-1]:.2f} s" for name, _, _ in [*nodes, ("storescp", 0, 0)]
                )
                if parts:
                    shutil.rmtree(dcmtk_out, ignore_errors=True)
                    dcmtk_out.mkdir()
                    clear_incoming(node_data)
                    times["storescp xN"].append(send_parallel(parts, dcmtk_port, "ANY-SCP"))
                    for name, port, data in nodes:
                        clear_incoming(data)
                        times.setdefault(f"{name} xN", []).append(send_parallel(parts, port, "OPENMSK"))
                    if legacy is not None:
                        clear_incoming(work / "legacy")
                        times.setdefault("legacy xN", []).append(send_parallel(parts, legacy.port, "OPENMSK"))
                    line += f"; x{args.senders}: " + ", ".join(
                        f"{name} {times[f'{name} xN'][-1]:.2f} s"
                        for name, _, _ in [*nodes, ("storescp", 0, 0)]
                    )
                print(line, flush=True)
        finally:
            if node is not None:
                node.stop()
            else:
                stop(node_proc)
            stop(storescp)
            if multi_proc is not None:
                stop(multi_proc)
            if legacy is not None:
                legacy.stop()
            if orthanc is not None:
                orthanc.stop()
        stored = sum(1 for _ in (node_data / "incoming").rglob("*.dcm"))  # those of the last round
    if stored != args.instances:
        print(f"node stored {stored} of {args.instances} instances", file=sys.stderr)
        return 1

    medians = {name: statistics.median(values) for name, values in times.items() if values}
    print()
    print(f"{'':16s}{'instances/s':>14s}{'MB/s':>10s}{'median s':>11s}")
    for name, seconds in medians.items():
        label = name.replace("xN", f"x{args.senders}")
        print(f"{label:16s}{args.instances / seconds:14.0f}{mb / seconds:10.1f}{seconds:11.2f}")
    print(
        f"ratio node/storescp, one association: {medians['storescp'] / medians['node']:.2f}  (target >= 0.7)"
    )
    if "node xN" in medians:
        ratio = medians["storescp xN"] / medians["node xN"]
        print(f"ratio node/storescp, {args.senders} concurrent associations: {ratio:.2f}  (target >= 0.9)")
    for suffix, label, target in (("", "one association", 0.7), (" xN", f"{args.senders} concurrent", 0.9)):
        if f"node p{args.processes}{suffix}" in medians:
            ratio = medians[f"storescp{suffix}"] / medians[f"node p{args.processes}{suffix}"]
            print(
                f"ratio node with {args.processes} receiver processes/storescp, {label}: {ratio:.2f}  "
                f"(target >= {target})"
            )
    if "orthanc" in medians:
        ratio = medians["orthanc"] / medians["node"]
        print(f"ratio node/Orthanc (storescu -> Orthanc, one association): {ratio:.2f}")
    for name in ("legacy", "legacy xN"):
        if name in medians:  # the same rounds, so the same load on the machine
            baseline = medians[name.replace("legacy", "storescp")]
            print(
                f"ratio {name.replace('xN', f'x{args.senders}')} (in-process, one fsync each)/storescp: "
                f"{baseline / medians[name]:.2f}"
            )
    if latency is None:
        print("completion latency: no job was queued within 60 s")
    else:
        print(f"completion latency (last instance acknowledged -> job queued): {latency:.2f} s")
    if profiler is not None:
        profiler.report(args.instances * args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
