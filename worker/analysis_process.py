"""The knee analysis, and the region SEG after it, in a process of its own beside the writing of the results.

Writing the SEG is pure Python (highdicom, pydicom) and holds the GIL; the analysis is NumPy/SciPy with
Python between the calls. As two threads of one process they slow each other down (measured on the 2-core
machine: the write stage went from 1.7 s to 2.5 s beside an analysis thread); in a second process each has a
core. The process is spawned once (at the worker's warm-up) and reused; it dies with the thread that started
it. If it is lost (killed, out of memory), the work runs in the calling thread instead and a new process
is started for the next job.

Once the analysis is back, the region SEG is written there too (:func:`start_region_seg`) while this process
draws the maps and builds the SR (from :func:`worker.dicom.seg.seg_header`, the SEG's identity, which needs
no writing): the two largest pieces of pydicom work after the analysis then run side by side.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

from openmsk.managed.process import die_with_parent
from worker.analysis import FaceThickness, KneeAnalysis, analyse_knee
from worker.dicom.general import HeaderVolume, VolumeLike
from worker.dicom.seg import SegResult, write_seg

log = logging.getLogger("openmsk.worker")

T = TypeVar("T")

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


def _executor() -> ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            # spawn, not fork: the worker has torch's thread pools, which a forked child must not inherit
            _pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent
            )
        return _pool


def _reset() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


class HelperCall(Generic[T]):
    """``function(*args)`` under way in the helper process; :meth:`result` gives its value, computed in this
    thread instead when the process is unavailable or lost. An exception of the function itself is raised
    from :meth:`result` as it is."""

    def __init__(self, function: Callable[..., T], *args: Any) -> None:
        self._call = (function, args)
        self._future: Future[T] | None
        try:
            self._future = _executor().submit(function, *args)
        except (BrokenProcessPool, RuntimeError, OSError) as exc:
            log.warning("helper process unavailable (%s): working in this thread", exc)
            _reset()
            self._future = None

    def result(self) -> T:
        if self._future is not None:
            try:
                return self._future.result()
            except BrokenProcessPool as exc:
                log.warning("helper process lost (%s): working in this thread", exc)
                _reset()
        function, args = self._call
        return function(*args)


class Analysis:
    """One analysis under way; :meth:`result` gives the measurements (as :func:`worker.analysis.analyse`),
    after which :attr:`region_map` holds the cartilage subregion map (None when the knee's frame could not
    be built; the measurements say why) and :attr:`faces` the per-face thickness the maps draw."""

    def __init__(self, labels: NDArray[Any], spacing: Sequence[float]) -> None:
        self.region_map: NDArray[np.uint8] | None = None
        self.faces: dict[int, FaceThickness] = {}
        self._run: HelperCall[KneeAnalysis] = HelperCall(
            analyse_knee, np.asarray(labels), tuple(float(s) for s in spacing)
        )

    def result(self) -> dict[str, Any]:
        found = self._run.result()
        self.region_map, self.faces = found.region_map, found.faces
        return found.measurements


def start_analysis(labels: NDArray[Any], spacing: Sequence[float]) -> Analysis:
    """Start analysing *labels* (voxel *spacing* in mm) in the analysis process; collect with ``.result()``."""
    return Analysis(labels, spacing)


def _write_region_seg(
    volume: HeaderVolume,
    region_map: NDArray[Any],
    model_name: str,
    model_version: str,
    path: Path,
    labelmap: bool,
) -> SegResult:
    # The dataset stays here: sending ~1300 frame items back would cost what was saved.
    return replace(
        write_seg(volume, region_map, model_name, model_version, path, regions=True, labelmap=labelmap),
        dataset=None,
    )


def start_region_seg(
    volume: VolumeLike,
    region_map: NDArray[Any],
    model_name: str,
    model_version: str,
    path: Path,
    *,
    labelmap: bool = False,
) -> HelperCall[SegResult]:
    """Start writing the region SEG of *region_map* to *path* in the helper process; ``.result()`` waits
    for it and gives its :class:`~worker.dicom.seg.SegResult` (without the dataset)."""
    return HelperCall(
        _write_region_seg, HeaderVolume.of(volume), region_map, model_name, model_version, path, labelmap
    )


def helper_pid() -> int | None:
    """The analysis process's PID while one runs (for logs and tests), else ``None``."""
    with _lock:
        processes = list((_pool._processes or {}).values()) if _pool is not None else []
    return processes[0].pid if processes else None


def shutdown() -> None:
    """Stop the analysis process (a worker stopping; it would also end with the worker)."""
    _reset()
