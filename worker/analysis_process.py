"""The knee analysis in a process of its own, beside the writing of the results.

Writing the SEG is pure Python (highdicom, pydicom) and holds the GIL; the analysis is NumPy/SciPy with
Python between the calls. As two threads of one process they slow each other down (measured on the 2-core
machine: the write stage went from 1.7 s to 2.5 s beside an analysis thread); in a second process each has a
core. The process is spawned once (at the worker's warm-up) and reused; it dies with the thread that started
it. If it is lost (killed, out of memory), the analysis runs in the calling thread instead and a new process
is started for the next job.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from numpy.typing import NDArray

from openmsk.managed.process import die_with_parent
from worker.analysis import FaceThickness, KneeAnalysis, analyse_knee

log = logging.getLogger("openmsk.worker")

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


class Analysis:
    """One analysis under way; :meth:`result` gives the measurements (as :func:`worker.analysis.analyse`),
    after which :attr:`region_map` holds the cartilage subregion map (None when the knee's frame could not
    be built; the measurements say why) and :attr:`faces` the per-face thickness the maps draw."""

    def __init__(self, labels: NDArray[Any], spacing: Sequence[float]) -> None:
        self._labels = labels
        self._spacing = tuple(float(s) for s in spacing)
        self._future: Future[KneeAnalysis] | None
        self.region_map: NDArray[np.uint8] | None = None
        self.faces: dict[int, FaceThickness] = {}
        try:
            self._future = _executor().submit(analyse_knee, np.asarray(labels), self._spacing)
        except (BrokenProcessPool, RuntimeError, OSError) as exc:
            log.warning("analysis process unavailable (%s): analysing in this thread", exc)
            _reset()
            self._future = None

    def result(self) -> dict[str, Any]:
        if self._future is not None:
            try:
                return self._keep(self._future.result())
            except BrokenProcessPool as exc:
                log.warning("analysis process lost (%s): analysing in this thread", exc)
                _reset()
        return self._keep(analyse_knee(self._labels, self._spacing))

    def _keep(self, found: KneeAnalysis) -> dict[str, Any]:
        self.region_map, self.faces = found.region_map, found.faces
        return found.measurements


def start_analysis(labels: NDArray[Any], spacing: Sequence[float]) -> Analysis:
    """Start analysing *labels* (voxel *spacing* in mm) in the analysis process; collect with ``.result()``."""
    return Analysis(labels, spacing)


def helper_pid() -> int | None:
    """The analysis process's PID while one runs (for logs and tests), else ``None``."""
    with _lock:
        processes = list((_pool._processes or {}).values()) if _pool is not None else []
    return processes[0].pid if processes else None


def shutdown() -> None:
    """Stop the analysis process (a worker stopping; it would also end with the worker)."""
    _reset()
