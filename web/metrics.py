"""``GET /metrics``: Prometheus text format, open to scrapers like ``/health``.

- ``openmsk_jobs{state}`` — jobs per state (gauge, from the job store's indexes);
- ``openmsk_workers`` — workers with a fresh heartbeat (gauge);
- ``openmsk_stage_duration_seconds{stage,model}`` — per-stage durations of finished jobs (histogram);
- ``openmsk_instances_received_total{source}`` — DICOM instances that arrived in jobs (counter);
- ``openmsk_deliveries_total{destination,result}`` — deliveries of finished jobs by result (counter);
- ``openmsk_archive_series{destination,status}`` — series whose images are not yet at an archive destination,
  by status: pending, retrying, failed (gauge, from the forwarder's states in Redis);
- ``openmsk_archive_<name>_total`` — the forwarder's own counters: instances sent, orders done, send failures
  (counter, kept in Redis by the forwarder);
- ``openmsk_archive_outbox_orders`` — forward orders waiting in ``DATA_DIR/forward/`` (gauge).

Counters and histograms must only grow, and they must survive a restart of the web and be counted once when
several web processes are scraped, so they are kept in Redis: at each scrape the jobs not yet observed are
added, each exactly once (a Lua script marks a job observed and adds its numbers in one atomic step).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from flask import Blueprint, Response

from openmsk.forwarding import ForwardOutbox, ForwardStates
from openmsk.heartbeat import live_workers
from openmsk.jobs import INDEX_ALL, INDEX_STATE, KEY_PREFIX, Job, JobState, JobStore
from web.context import redis_client, settings

metrics = Blueprint("metrics", __name__)

AGGREGATE = "openmsk:metrics:aggregate"
SEEN_CREATED = "openmsk:metrics:seen:created"
SEEN_FINISHED = "openmsk:metrics:seen:finished"
SCAN_LIMIT = 1000  # newest jobs looked at per scrape; more than that between two scrapes would be missed
BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, math.inf)
SEP = "\x1f"  # between the parts of an aggregate field name (never inside a label value we write)

_OBSERVE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""


def _field(*parts: str) -> str:
    return SEP.join(parts)


def _bucket(value: float) -> str:
    return "+Inf" if math.isinf(value) else f"{value:g}"


def _finished_increments(job: Job) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for stage, timing in job.stages.items():
        seconds = timing.duration_s
        if seconds is None or seconds < 0:
            continue
        for bound in BUCKETS:
            if seconds <= bound:
                out[_field("stage_bucket", stage, job.model, _bucket(bound))] += 1
        out[_field("stage_sum", stage, job.model)] += seconds
        out[_field("stage_count", stage, job.model)] += 1
    for name, delivery in job.deliveries.items():
        out[_field("delivery", name, delivery.status)] += 1
    return out


def _observe(
    client: redis.Redis, seen_key: str, ids: list[bytes], increments_of: Callable[[Job], dict[str, float]]
) -> None:
    """Add the numbers of the jobs among ``ids`` that ``seen_key`` does not hold yet."""
    if not ids:
        return
    flags = client.smismember(seen_key, ids)
    unseen = [i for i, seen in zip(ids, flags, strict=True) if not seen]
    if not unseen:
        return
    script = client.register_script(_OBSERVE)
    for raw in client.mget([KEY_PREFIX + i.decode() for i in unseen]):
        if raw is None:
            continue
        job = Job.model_validate_json(raw)
        args: list[str | float] = [job.id]
        for name, value in increments_of(job).items():
            args += [name, value]
        script(keys=[seen_key, AGGREGATE], args=args)


def collect(client: redis.Redis) -> dict[str, float]:
    """Bring the aggregates up to date with the newest jobs and return them."""
    _observe(
        client,
        SEEN_CREATED,
        client.zrevrange(INDEX_ALL, 0, SCAN_LIMIT - 1),
        lambda job: {_field("instances", job.source): float(job.instance_count)},
    )
    for state in (JobState.DONE, JobState.FAILED):
        _observe(
            client,
            SEEN_FINISHED,
            client.zrevrange(INDEX_STATE + state.value, 0, SCAN_LIMIT - 1),
            _finished_increments,
        )
    return {k.decode(): float(v) for k, v in client.hgetall(AGGREGATE).items()}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass
class ArchiveFigures:
    """The forwarding figures: unfinished series per destination and status, counters, outbox size."""

    waiting: dict[str, dict[str, int]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    outbox_orders: int = 0


def archive_figures(client: redis.Redis, outbox: ForwardOutbox) -> ArchiveFigures:
    states = ForwardStates(client)
    return ArchiveFigures(states.waiting(), states.counters(), len(outbox))


def _metric_name(name: str) -> str:
    """A counter name of the forwarder as part of a metric name (letters, digits, underscores)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def render_archive(figures: ArchiveFigures) -> list[str]:
    lines = [
        "# HELP openmsk_archive_series Series whose images are not yet at an archive destination, by status.",
        "# TYPE openmsk_archive_series gauge",
        *(
            f"openmsk_archive_series{_labels(destination=destination, status=status)} {count}"
            for destination, per in sorted(figures.waiting.items())
            for status, count in sorted(per.items())
        ),
    ]
    for name, value in sorted(figures.counters.items()):
        metric = f"openmsk_archive_{_metric_name(name)}_total"
        lines += [
            f"# HELP {metric} Forwarding of images to the archive: {name.replace('_', ' ')}.",
            f"# TYPE {metric} counter",
            f"{metric} {value}",
        ]
    lines += [
        "# HELP openmsk_archive_outbox_orders Forward orders waiting in the outbox (DATA_DIR/forward).",
        "# TYPE openmsk_archive_outbox_orders gauge",
        f"openmsk_archive_outbox_orders {figures.outbox_orders}",
    ]
    return lines


def render(
    counts: dict[str, int],
    workers: int,
    aggregate: dict[str, float],
    archive: ArchiveFigures | None = None,
) -> str:
    """The exposition text for the gauges and the Redis aggregates."""
    lines = [
        "# HELP openmsk_jobs Jobs in each state.",
        "# TYPE openmsk_jobs gauge",
        *(f"openmsk_jobs{_labels(state=s)} {n}" for s, n in counts.items()),
        "# HELP openmsk_workers Workers with a fresh heartbeat.",
        "# TYPE openmsk_workers gauge",
        f"openmsk_workers {workers}",
        "# HELP openmsk_stage_duration_seconds Duration of each pipeline stage of finished jobs.",
        "# TYPE openmsk_stage_duration_seconds histogram",
    ]
    parts = {tuple(k.split(SEP)): v for k, v in aggregate.items()}
    series = sorted({(p[1], p[2]) for p in parts if p[0] == "stage_count"})
    for stage, model in series:
        for bound in BUCKETS:
            count = parts.get(("stage_bucket", stage, model, _bucket(bound)), 0.0)
            le = _bucket(bound)
            lines.append(
                f"openmsk_stage_duration_seconds_bucket{_labels(stage=stage, model=model, le=le)} "
                f"{_number(count)}"
            )
        lines.append(
            f"openmsk_stage_duration_seconds_sum{_labels(stage=stage, model=model)} "
            f"{_number(parts[('stage_sum', stage, model)])}"
        )
        lines.append(
            f"openmsk_stage_duration_seconds_count{_labels(stage=stage, model=model)} "
            f"{_number(parts[('stage_count', stage, model)])}"
        )
    lines += [
        "# HELP openmsk_instances_received_total DICOM instances received in jobs.",
        "# TYPE openmsk_instances_received_total counter",
        *(
            f"openmsk_instances_received_total{_labels(source=p[1])} {_number(v)}"
            for p, v in sorted(parts.items())
            if p[0] == "instances"
        ),
        "# HELP openmsk_deliveries_total Deliveries of finished jobs, by destination and result.",
        "# TYPE openmsk_deliveries_total counter",
        *(
            f"openmsk_deliveries_total{_labels(destination=p[1], result=p[2])} {_number(v)}"
            for p, v in sorted(parts.items())
            if p[0] == "delivery"
        ),
    ]
    lines += render_archive(archive or ArchiveFigures())
    return "\n".join(lines) + "\n"


@metrics.get("/metrics")
def get_metrics() -> Response:
    client, node = redis_client(), settings()
    text = render(
        JobStore(client).counts_by_state(),
        len(live_workers(client, node.worker_stale_s)),
        collect(client),
        archive_figures(client, ForwardOutbox(node.data_path)),
    )
    return Response(text, mimetype="text/plain", headers={"Content-Type": "text/plain; version=0.0.4"})
