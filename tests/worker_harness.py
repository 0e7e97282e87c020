"""Running real worker processes against a job in the test Redis, for the worker's end-to-end tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom

from openmsk.jobs import Job, JobState, JobStore
from openmsk.phantom import generate, write_series
from openmsk.queue import enqueue_job, make_broker


def stage_phantom(
    data_dir: Path, seed: int, orientation: str = "sagittal", laterality: str = "R"
) -> tuple[Path, Path]:
    """Write a small phantom and lay its DICOM out as the SCP does (incoming/<study>/<series>/<sop>.dcm).

    Returns (phantom folder, series folder)."""
    phantom_dir = data_dir.parent / f"phantom-{seed}-{orientation}-{laterality}"
    write_series(
        generate(seed=seed, size="small", orientation=orientation, laterality=laterality), phantom_dir
    )
    series_dir = None
    for path in sorted((phantom_dir / "dicom").iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series_dir = data_dir / "incoming" / ds.StudyInstanceUID / ds.SeriesInstanceUID
        series_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, series_dir / f"{ds.SOPInstanceUID}.dcm")  # named as the SCP stores them
    assert series_dir is not None
    return phantom_dir, series_dir


def submit(
    redis_url: str,
    data_dir: Path,
    series_dir: Path,
    model: str,
    destinations: list[str],
    priority: str = "default",
) -> Job:
    """Create and queue a job for the staged series, as the SCP does."""
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series_dir.iterdir())]
    job = Job(
        source="scp",
        calling_ae="TESTSCU",
        study_uid=datasets[0].StudyInstanceUID,
        series_uid=datasets[0].SeriesInstanceUID,
        sop_uids=[ds.SOPInstanceUID for ds in datasets],
        model=model,
        input_path=str(series_dir.relative_to(data_dir)),
        destinations=destinations,
        priority=priority,
    )
    store = JobStore.from_url(redis_url)
    store.create(job)
    store.transition(job.id, JobState.QUEUED)
    broker = make_broker(redis_url)
    enqueue_job(broker, job)
    broker.close()
    return job
