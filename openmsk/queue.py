"""The job queue: Dramatiq on Redis, shared by the senders (SCP, web) and the consumer (worker).

Senders enqueue by actor *name*, so the SCP and the web never import the worker's code (and with it torch).
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from openmsk.jobs import Job

NAMESPACE = "openmsk"
SEGMENT_ACTOR = "segment_job"
SEGMENT_URGENT_ACTOR = "segment_job_urgent"
DELIVER_ACTOR = "deliver_job"
QUEUES = ("urgent", "default")
DELIVER_QUEUE = "deliver"
# Dramatiq orders a worker's pending messages by actor priority (lower first), not by queue: urgent jobs go to an
# actor of their own so a worker that holds one of each takes the urgent one first.
SEGMENT_ACTORS = {"urgent": SEGMENT_URGENT_ACTOR, "default": SEGMENT_ACTOR}

# A worker killed with SIGKILL stops heart-beating; after HEARTBEAT_TIMEOUT_MS another worker's maintenance pass
# puts its unacked messages back. Dramatiq's defaults (60 s, maintenance on 0.1 % of broker commands) can hold a
# job for many minutes. Each worker issues a few commands a second (its idle delay-queue consumers poll), so
# maintenance on half of them finds a dead worker within seconds.
HEARTBEAT_TIMEOUT_MS = 6_000
MAINTENANCE_CHANCE = 500_000  # out of dramatiq's scale of 1 000 000 commands


def make_broker(redis_url: str) -> RedisBroker:
    """A Redis broker for the node's namespace, set as Dramatiq's global broker."""
    broker = RedisBroker(
        url=redis_url,
        namespace=NAMESPACE,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
        maintenance_chance=MAINTENANCE_CHANCE,
    )
    dramatiq.set_broker(broker)
    return broker


def enqueue_job(broker: RedisBroker, job: Job) -> str:
    """Send the message that makes a worker run ``job``; returns the message id."""
    message = dramatiq.Message(
        queue_name=job.priority,
        actor_name=SEGMENT_ACTORS[job.priority],
        args=(job.id,),
        kwargs={},
        options={},
    )
    return broker.enqueue(message).message_id
