"""Memory of the web process during a 600 MB upload: it must grow by less than 100 MB.

Starts a private Redis and ``openmsk web`` (waitress, as in production) on a temporary DATA_DIR, warms it up
with small uploads of each kind (so imports and caches are in the baseline), resets the process's peak-RSS
counter (``/proc/<pid>/clear_refs``) and sends one upload of just under ``OPENMSK_MAX_UPLOAD_MB`` (600 MB),
generated on the fly so that this client holds none of it either:

- ``--kind nifti`` (default): one 512×512×N float32 NIfTI volume, sent with a Content-Length;
- ``--kind dicom-zip``: a zip of 512×512 16-bit DICOM slices (extension-less names), sent chunked; the web
  stores the zip, checks and extracts it, reads every header and keeps the series.

Printed: the baseline RSS, the peak RSS during the upload (``VmHWM``, and a 20 ms sample as a cross-check),
the growth, the time and throughput, and what was stored. Exit status 1 when the growth reaches the budget or
the upload is not accepted.

    .venv/bin/python bench/upload.py [--kind nifti|dicom-zip] [--mb 600] [--budget-mb 100]

It needs about three times the upload size free under the temporary folder (waitress's request buffer, the
upload, and for a zip what it expands to; all on disk).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openmsk.managed.process import free_port, spawn, stop, wait_until
from openmsk.managed.redis import ManagedRedis
from openmsk.models.registry import ModelEntry, hash_files, write_registry

MB = 1024 * 1024
TOKEN = "bench-" + uuid.uuid4().hex
CHUNK = MB


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def nifti_header(shape: tuple[int, int, int]) -> bytes:
    """A NIfTI-1 single-file header (352 bytes) for a float32 volume of ``shape``."""
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *shape, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 16, 32)  # datatype FLOAT32, bitpix
    struct.pack_into("<8f", header, 76, 1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0)
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    struct.pack_into("<f", header, 112, 1.0)  # scl_slope
    header[344:348] = b"n+1\x00"
    return bytes(header)


def nifti_upload(limit_bytes: int) -> tuple[str, int | None, Iterator[bytes]]:
    """The largest 512×512×N float32 NIfTI below ``limit_bytes``: (description, length, chunks)."""
    shape = (512, 512, (limit_bytes - 352) // (512 * 512 * 4))
    data = shape[0] * shape[1] * shape[2] * 4

    def chunks() -> Iterator[bytes]:
        yield nifti_header(shape)
        block, left = bytes(CHUNK), data
        while left:
            yield block[: min(CHUNK, left)]
            left -= min(CHUNK, left)

    return f"NIfTI {'×'.join(map(str, shape))} float32", 352 + data, chunks()


class _Collector(io.RawIOBase):
    """An unseekable stream that keeps what zipfile writes until the generator hands it on."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.chunks.append(bytes(data))
        return len(data)


def dicom_zip_upload(limit_bytes: int) -> tuple[str, int | None, Iterator[bytes]]:
    """A zip (stored) of a 512×512 16-bit MR series just below ``limit_bytes``, built slice by slice."""
    import pydicom

    from openmsk.phantom import generate, write_series

    folder = Path(tempfile.mkdtemp(prefix="openmsk-bench-template-"))
    write_series(generate(seed=1, size="small"), folder)
    template = pydicom.dcmread(next((folder / "dicom").iterdir()))
    shutil.rmtree(folder)
    template.Rows = template.Columns = 512
    template.PixelData = bytes(512 * 512 * 2)
    slice_bytes = len(template.PixelData) + 2048
    count = int(limit_bytes * 0.98) // slice_bytes
    series_uid = pydicom.uid.generate_uid()

    def chunks() -> Iterator[bytes]:
        sink = _Collector()
        with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive:
            for number in range(count):
                template.SeriesInstanceUID = series_uid
                template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = (
                    pydicom.uid.generate_uid()
                )
                template.InstanceNumber = number + 1
                template.ImagePositionPatient = [0.0, 0.0, float(number)]
                buffer = io.BytesIO()
                template.save_as(buffer, enforce_file_format=True)
                archive.writestr(f"EXPORT/SERIES/IM{number:05d}", buffer.getvalue())
                yield from sink.chunks
                sink.chunks.clear()
        yield from sink.chunks

    return f"zip of {count} DICOM slices 512×512 16-bit", None, chunks()


def multipart(length: int | None, chunks: Iterator[bytes]) -> tuple[int | None, str, Iterator[bytes]]:
    """The file in a multipart body: (length, content type, chunks); ``None`` length: sent chunked."""
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload"\r\n\r\n'.encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        yield from chunks
        yield tail

    total = None if length is None else len(head) + length + len(tail)
    return total, f"multipart/form-data; boundary={boundary}", body()


class CountingBody:
    """Counts the bytes a generated body had, for the throughput line."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.sent = chunks, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.sent += len(chunk)
            yield chunk


def post(port: int, length: int | None, content_type: str, body: Iterable[bytes]) -> tuple[int, dict]:
    """POST /api/jobs; without a length the body goes chunked (waitress then counts it as it arrives)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}
    if length is not None:
        headers["Content-Length"] = str(length)
    conn.request("POST", "/api/jobs", body=body, headers=headers, encode_chunked=length is None)
    response = conn.getresponse()
    payload = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, payload


def write_registry_for(folder: Path) -> Path:
    """A registry with one (tiny, verifiable) model, so uploads are accepted without installing a real one."""
    folder.mkdir(parents=True)
    weights = folder / "weights.pt"
    weights.write_bytes(b"bench")
    entry = ModelEntry(
        name="bench",
        kind="slicewise2d",
        folder=folder,
        labels={1: "femur"},
        checkpoint="weights.pt",
        sha256=hash_files(folder, [weights]),
        default=True,
    )
    return write_registry(folder / "registry.toml", [entry]).path


class Sampler(threading.Thread):
    """Samples VmRSS every 20 ms as a cross-check of the kernel's peak counter."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.stopped = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak_kb = max(self.peak_kb, status_kb(self.pid, "VmRSS"))
            time.sleep(0.02)


KINDS = {"nifti": nifti_upload, "dicom-zip": dicom_zip_upload}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mb", type=int, default=600, help="OPENMSK_MAX_UPLOAD_MB; the upload is just under it"
    )
    parser.add_argument(
        "--budget-mb", type=float, default=100.0, help="allowed growth of the web process's RSS"
    )
    parser.add_argument(
        "--kind", choices=sorted(KINDS), default="nifti", help="what to upload (default: one NIfTI volume)"
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="openmsk-bench-upload-"))
    web = None
    try:
        free = shutil.disk_usage(root).free
        if free < 3.2 * args.mb * MB:
            print(f"need {3.2 * args.mb:.0f} MB free under {root}, have {free // MB} MB", file=sys.stderr)
            return 2
        with ManagedRedis(root / "redis") as redis_server:
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("OPENMSK_")}
            env |= {
                "OPENMSK_DATA_DIR": str(root / "data"),
                "OPENMSK_REDIS_URL": redis_server.url,
                "OPENMSK_WEB_PORT": str(port),
                "OPENMSK_API_TOKENS": TOKEN,
                "OPENMSK_MAX_UPLOAD_MB": str(args.mb),
                "OPENMSK_MODEL_REGISTRY": str(write_registry_for(root / "model")),
                "OPENMSK_MIN_FREE_DISK_MB": "0",
            }
            web = spawn([sys.executable, "-m", "openmsk", "web"], env=env, log=root / "web.log")

            def answering() -> bool:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                try:
                    conn.request("GET", "/metrics")
                    return conn.getresponse().status == 200
                except OSError:
                    return False
                finally:
                    conn.close()

            wait_until(answering, 60, "openmsk web", web)

            for kind in KINDS.values():  # warm-up: imports, first jobs, Redis connections
                _, length, chunks = kind(4 * MB)
                status, _ = post(port, *multipart(length, chunks))
                if status != 202:
                    break
            if status != 202:
                print(f"warm-up upload answered {status}; see {root / 'web.log'}", file=sys.stderr)
                return 1
            baseline_kb = status_kb(web.pid, "VmRSS")
            Path(f"/proc/{web.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS

            what, length, chunks = KINDS[args.kind](args.mb * MB)
            body = CountingBody(chunks)
            length, content_type, parts = multipart(length, iter(body))
            sampler = Sampler(web.pid)
            sampler.start()
            start = time.perf_counter()
            status, answer = post(port, length, content_type, parts)
            seconds = time.perf_counter() - start
            sampler.stopped.set()
            sampler.join()
            peak_kb = max(status_kb(web.pid, "VmHWM"), sampler.peak_kb)
            folder = root / "data" / "uploads" / answer.get("id", "-")
            stored = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []

            growth_mb = (peak_kb - baseline_kb) / 1024
            print(f"upload            {body.sent / MB:.1f} MB ({what}) → HTTP {status}")
            print(f"time              {seconds:.1f} s ({body.sent / MB / seconds:.0f} MB/s)")
            print(f"web RSS baseline  {baseline_kb / 1024:.1f} MB")
            print(
                f"web RSS peak      {peak_kb / 1024:.1f} MB (VmHWM; sampled {sampler.peak_kb / 1024:.1f} MB)"
            )
            print(f"growth            {growth_mb:.1f} MB (budget {args.budget_mb:.0f} MB)")
            size = sum(p.stat().st_size for p in stored)
            where = (
                f"{len(stored)} file(s), {size / MB:.1f} MB in {folder.relative_to(root)}"
                if stored
                else "nothing"
            )
            print(f"stored            {where}")
            ok = status == 202 and bool(stored) and growth_mb < args.budget_mb
            print("PASS" if ok else "FAIL")
            return 0 if ok else 1
    finally:
        if web is not None:
            stop(web)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
