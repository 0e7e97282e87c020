"""Time from a scanner's last C-STORE to "images and SEG visible in Orthanc", for the node's two topologies.

- **first hop**: scanner --storescu--> node SCP; the node archives the images in Orthanc (forwarder) and the
  worker delivers SEG/SR after them. Completion waits ``OPENMSK_SERIES_QUIET_S`` after the association ends.
- **behind Orthanc**: scanner --storescu--> Orthanc; Orthanc's auto-routing (orthanc/autoroute.lua) sends the
  series to the node once it is stable (``StableAge`` seconds without a new instance), the node segments and
  delivers the SEG/SR back.

Both run side by side in one process tree (one Redis, one Orthanc, the node's SCP and one worker as their own
processes, as in production), alternating per round with a new phantom series each time; printed per round and
as medians, with the ratio behind-Orthanc / first-hop. The clock starts when storescu exits (every instance
acknowledged, association released) and stops when Orthanc answers a query with the series' images (all of
them) and the node's SEG in the same study.

    .venv/bin/python bench/latency.py [--size full|small] [--rounds 2] [--stable-age 10] [--quiet 2]

Defaults are the shipped ones: Orthanc's StableAge 10 s (orthanc/orthanc.json), the node's quiet time 2 s.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom
import requests

from openmsk.config import REPO_DIR
from openmsk.managed.orthanc import ManagedOrthanc
from openmsk.managed.process import free_port
from openmsk.managed.redis import ManagedRedis
from openmsk.phantom import generate, write_series

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
NODE_AET = "OPENMSK"


def storescu(files: list[Path], port: int, called: str) -> None:
    subprocess.run(
        ["storescu", "-aet", "SCANNER1", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        check=True, env=DCMTK_ENV, timeout=600,
    )  # fmt: skip


def visible(orthanc: ManagedOrthanc, study_uid: str, series_uid: str, instances: int) -> bool:
    """The series' images (all) and a SEG are in the study at Orthanc."""
    auth = (orthanc.user, orthanc.password)

    def count(query: dict[str, str]) -> int:
        answer = requests.post(
            f"{orthanc.url}/tools/find", json={"Level": "Instance", "Query": query}, auth=auth, timeout=10
        )
        answer.raise_for_status()
        return len(answer.json())

    return (
        count({"StudyInstanceUID": study_uid, "Modality": "SEG"}) >= 1
        and count({"SeriesInstanceUID": series_uid}) >= instances
    )


def wait_visible(
    orthanc: ManagedOrthanc, study_uid: str, series_uid: str, instances: int, limit_s: float
) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if visible(orthanc, study_uid, series_uid, instances):
            return time.monotonic() - start
        time.sleep(0.1)
    raise SystemExit(f"series {series_uid}: not visible in Orthanc within {limit_s:.0f} s")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stable-age", type=int, default=10, help="Orthanc's StableAge (s); shipped: 10")
    parser.add_argument("--quiet", type=float, default=2.0, help="OPENMSK_SERIES_QUIET_S; shipped: 2")
    parser.add_argument("--limit", type=float, default=900.0, help="seconds one series may take")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="openmsk-latency-"))
    scp_port = free_port()
    redis = ManagedRedis(root / "redis").start()
    orthanc = ManagedOrthanc(
        data_dir=root / "orthanc", http_port=free_port(), dicom_port=free_port(), user="bench", password="bench",
        modalities={"openmsk": (NODE_AET, "127.0.0.1", scp_port)},
        lua_scripts=[REPO_DIR / "orthanc" / "autoroute.lua"], extra={"StableAge": args.stable_age},
    ).start()  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPENMSK_")},
        "OPENMSK_DATA_DIR": str(root / "data"),
        "OPENMSK_REDIS_URL": redis.url,
        "OPENMSK_SCP_HOST": "127.0.0.1",
        "OPENMSK_SCP_PORT": str(scp_port),
        "OPENMSK_SCP_AE_TITLE": NODE_AET,
        "OPENMSK_SERIES_QUIET_S": str(args.quiet),
        "OPENMSK_ORTHANC_URL": orthanc.url,
        "OPENMSK_ORTHANC_USER": orthanc.user,
        "OPENMSK_ORTHANC_PASSWORD": orthanc.password,
        "OPENMSK_ORTHANC_DICOM_PORT": str(orthanc.dicom_port),
        "OPENMSK_ORTHANC_AET": orthanc.aet,
        "OPENMSK_DEVICE": os.environ.get("OPENMSK_DEVICE", "auto"),
        "TCP_NODELAY": "1",
    }
    logs = root / "logs"
    logs.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "openmsk", name],
            env=env,
            stdout=open(logs / f"{name}.log", "wb"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        for name in ("scp", "worker")
    ]
    results: dict[str, list[float]] = {"first hop": [], "behind Orthanc": []}
    try:
        deadline = time.monotonic() + 120
        while not listening(scp_port):
            if time.monotonic() > deadline:
                raise SystemExit(f"the SCP did not start; see {logs}")
            time.sleep(0.2)
        print(
            f"{args.size} phantom, {args.rounds} round(s); StableAge {args.stable_age} s, quiet {args.quiet} s"
        )
        seed = 9100
        for round_no in range(1, args.rounds + 1):
            for topology in results:
                seed += 1
                phantom = generate(seed=seed, size=args.size)
                files = list(write_series(phantom, root / f"phantom-{seed}")["dicom_files"])
                first_file = pydicom.dcmread(files[0], stop_before_pixels=True)
                study_uid, series_uid = str(first_file.StudyInstanceUID), str(first_file.SeriesInstanceUID)
                if topology == "first hop":
                    storescu(files, scp_port, NODE_AET)
                else:
                    storescu(files, orthanc.dicom_port, orthanc.aet)
                seconds = wait_visible(orthanc, study_uid, series_uid, len(files), args.limit)
                results[topology].append(seconds)
                print(
                    f"round {round_no}  {topology:15s} {len(files)} instances  {seconds:6.1f} s", flush=True
                )
        first = statistics.median(results["first hop"])
        behind = statistics.median(results["behind Orthanc"])
        print()
        print(f"median, last C-STORE -> images + SEG in Orthanc: first hop {first:.1f} s, "
              f"behind Orthanc {behind:.1f} s; ratio behind/first {behind / first:.2f}")  # fmt: skip
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
        orthanc.stop()
        redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
