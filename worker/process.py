"""One worker process: a Dramatiq worker on the node's broker plus a heartbeat, until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
import time

import dramatiq
import redis

from openmsk.config import Settings
from openmsk.heartbeat import Heartbeat
from openmsk.queue import QUEUES, make_broker
from worker import analysis_process
from worker.device import device_info, gpu_free_probe, resolve_device

log = logging.getLogger("openmsk.worker")


def preload_default_model() -> None:
    """Load the default model and warm the write stages before taking jobs, so no job (nor a rerun after a
    crash) pays the ~10 s model load or the first-call costs of highdicom and SciPy."""
    from openmsk.models.registry import load_registry
    from worker.actors import segmenter_for, settings
    from worker.analysis_process import helper_pid
    from worker.warmup import warm_up_outputs

    try:
        name = load_registry(settings().model_registry).default.name
        started = time.monotonic()
        segmenter_for(name)
        log.info("model %s loaded in %.1f s", name, time.monotonic() - started)
    except Exception as exc:
        log.warning("default model not preloaded: %s", exc)  # jobs report the error if it persists
    try:
        seconds = warm_up_outputs()
        log.info("write/analyse stages warmed up in %.1f s (analysis process %s)", seconds, helper_pid())
    except Exception as exc:  # a warm-up is an optimisation: a job would show the same fault with its context
        log.warning("write/analyse warm-up failed: %s", exc)


def run_worker(settings: Settings, stop: threading.Event | None = None) -> int:
    """Consume jobs until ``stop`` is set or a termination signal arrives; returns an exit code."""
    if settings.redis_url is None:
        raise RuntimeError(
            "OPENMSK_REDIS_URL must be set for `openmsk worker` (`openmsk up` manages Redis itself)"
        )
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

    device = resolve_device(settings.device)
    broker = make_broker(settings.redis_url)
    from dramatiq.middleware import Retries

    import worker.actors
    from worker.bookkeeping import JobBookkeeping

    # "after" hooks run in reverse order: placed before Retries, the bookkeeping sees Retries' verdict.
    broker.add_middleware(JobBookkeeping(worker.actors.store), before=Retries)

    for queue in QUEUES:
        broker.declare_queue(queue)
    # One job at a time per worker: a GPU runs one model well. Prefetch 1: a prefetched message would sit in
    # this worker while another worker is idle, and would only come back after this one dies.
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=1000)
    worker.queue_prefetch = 1
    heartbeat = Heartbeat(
        redis.Redis.from_url(settings.redis_url),
        device_info(device),
        settings.worker_stale_s,
        gpu_free=gpu_free_probe(device),  # measured on every beat, not once before the model loads
    )
    heartbeat.start()
    preload_default_model()
    worker.start()
    log.info("worker %s running on %s", heartbeat.ident, device)
    try:
        stop.wait()
    finally:
        log.info("worker %s stopping", heartbeat.ident)
        worker.stop()
        analysis_process.shutdown()
        heartbeat.stop()
        broker.close()
    return 0
