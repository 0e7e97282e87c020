"""Times the worker's stages through the pipeline's own progress callback (shared by the pipeline benches)."""

from __future__ import annotations

import time


class StageTimer:
    """A progress callback that records when each stage starts; ``durations()`` gives seconds per stage."""

    def __init__(self) -> None:
        self.starts: dict[str, float] = {}
        self.end = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.perf_counter()
        self.starts.setdefault(stage, now)
        self.end = now

    def durations(self) -> dict[str, float]:
        names = list(self.starts)
        ends = [self.starts[n] for n in names[1:]] + [self.end]
        return {name: end - self.starts[name] for name, end in zip(names, ends, strict=True)}
