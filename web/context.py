"""What a request of the web app works with: the app's settings, job store, Redis, broker and durations.

``create_app`` (``web/__init__.py``) puts them on the app; every blueprint and helper takes them from here, so
no module of the room has to import another's blueprint to reach them. Each accessor works inside an
application context only.
"""

from __future__ import annotations

import redis
from dramatiq.brokers.redis import RedisBroker
from flask import current_app

from openmsk.config import Settings
from openmsk.forwarding import ForwardOutbox, ForwardStates
from openmsk.jobs import JobStore
from openmsk.objectstore import ObjectStore, store_for
from web.stats import RecentDurations

SETTINGS = "OPENMSK_SETTINGS"  # in app.config
REDIS = "openmsk_redis"  # the rest in app.extensions
STORE = "openmsk_store"
BROKER = "openmsk_broker"
DURATIONS = "openmsk_durations"
OBJECTS = "openmsk_objects"


def settings() -> Settings:
    return current_app.config[SETTINGS]


def redis_client() -> redis.Redis:
    return current_app.extensions[REDIS]


def store() -> JobStore:
    return current_app.extensions[STORE]


def broker() -> RedisBroker:
    return current_app.extensions[BROKER]


def durations() -> RecentDurations:
    return current_app.extensions[DURATIONS]


def forward_states() -> ForwardStates:
    """Where each series stands with its archive destinations (written by the forwarder, read here)."""
    return ForwardStates(redis_client())


def forward_outbox() -> ForwardOutbox:
    """The forward orders waiting on disk (``DATA_DIR/forward/``)."""
    return ForwardOutbox(settings().data_path)


def objects() -> ObjectStore:
    """Where the workers find inputs and leave outputs: DATA_DIR itself, or the object store (made once)."""
    found = current_app.extensions.get(OBJECTS)
    if found is None:
        found = current_app.extensions[OBJECTS] = store_for(settings())
    return found
