"""Writing a full-size knee's DICOM outputs: the node's ``save_dataset`` (sequences encoded by
worker/dicom/encoding.py) side by side with pydicom's own writing of the same objects.

Baseline named for the ratios: ``Dataset.save_as`` of pydicom into the same atomic, fsync'd file (what
``save_dataset`` did before), on the same in-memory object, alternating with the node's writer in the same run;
both files are compared byte for byte. Printed per object: the median of
``--repeat`` writes of each, their ratio, and whether the bytes are the same.

    .venv/bin/python bench/dicom_write.py [--size full] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.dataset import Dataset

import worker.dicom.encoding as encoding
from openmsk.atomic import atomic_file
from openmsk.phantom import generate, write_series
from worker.analysis import analyse_knee
from worker.dicom.general import save_dataset
from worker.dicom.seg import write_seg
from worker.dicom.sr import write_sr
from worker.volume import load_series, read_series


def _built(out: Path, size: str) -> dict[str, Dataset]:
    """The tissue SEG, the region SEG and the SR of one phantom, as the writers built them."""
    ph = generate(seed=3, size=size, orientation="sagittal", laterality="R")
    volume = load_series(read_series(write_series(ph, out / "phantom")["dicom_dir"]))
    labels = np.asfortranarray(ph.labels)
    analysis = analyse_knee(labels, volume.spacing)
    if analysis.region_map is None:
        raise SystemExit("the analysis found no knee frame")
    built: dict[str, Dataset] = {}
    real = encoding.with_encoded_sequences

    def keep(dataset: Dataset) -> Dataset:
        built[f"{dataset.SeriesDescription}"[:48]] = dataset
        return real(dataset)

    encoding.with_encoded_sequences = keep  # type: ignore[assignment]
    try:
        seg = write_seg(volume, labels, "bench", "1", out / "seg.dcm")
        rseg = write_seg(volume, analysis.region_map, "bench", "1", out / "regions.dcm", regions=True)
        write_sr(
            seg.dataset, volume, analysis.measurements, "bench", "1", out / "sr.dcm", region_seg=rseg.dataset
        )
    finally:
        encoding.with_encoded_sequences = real  # type: ignore[assignment]
    return built


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="full", choices=("small", "full"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="openmsk-bench-write-") as tmp:
        out = Path(tmp)
        built = _built(out, args.size)
        print(f"{'object':<50} {'pydicom s':>10} {'node s':>8} {'ratio':>6}  same bytes")
        for name, dataset in built.items():
            plain_s, node_s = [], []
            for _ in range(args.repeat):
                started = time.perf_counter()
                with atomic_file(out / "plain.dcm") as fh:
                    dataset.save_as(fh, enforce_file_format=True)
                plain_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                path = save_dataset(dataset, out / "written.dcm")
                node_s.append(time.perf_counter() - started)
            same = path.read_bytes() == (out / "plain.dcm").read_bytes()
            a, b = statistics.median(plain_s), statistics.median(node_s)
            print(f"{name:<50} {a:10.3f} {b:8.3f} {b / a:6.2f}  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
