"""The web's rate limit (web/security.py check_rate) against the real Redis, on a clock the test moves."""

from __future__ import annotations

import pytest
import redis

from web.errors import RequestError
from web.security import check_rate


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_limit_per_window_and_retry_after(redis_client: redis.Redis) -> None:
    clock = Clock(999_980.0)  # 20 s into a one-minute window (999 960 = 16 666 minutes)
    for _ in range(3):
        check_rate(redis_client, "upload", "client-a", 3, clock=clock)
    with pytest.raises(RequestError) as refused:
        check_rate(redis_client, "upload", "client-a", 3, clock=clock)
    assert refused.value.status == 429 and refused.value.code == "RATE_LIMITED"
    assert refused.value.headers["Retry-After"] == "40"  # until the window ends
    check_rate(redis_client, "upload", "client-b", 3, clock=clock)  # another client has its own count
    check_rate(redis_client, "sign-in", "client-a", 3, clock=clock)  # and another action
    clock.now += 39.5  # still the same window
    with pytest.raises(RequestError):
        check_rate(redis_client, "upload", "client-a", 3, clock=clock)
    clock.now += 0.5  # the next window starts afresh
    for _ in range(3):
        check_rate(redis_client, "upload", "client-a", 3, clock=clock)


def test_counts_expire_with_their_window(redis_client: redis.Redis) -> None:
    check_rate(redis_client, "upload", "client-c", 5, clock=Clock(2_000_000.0))
    [key] = redis_client.keys("*client-c*")
    assert 60 < redis_client.ttl(key) <= 120  # kept two windows, never forever
