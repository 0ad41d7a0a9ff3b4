"""The rq worker's wait for Redis at start: backoff, one line per retry, the budget."""

from __future__ import annotations

import logging

import pytest
import redis.exceptions

from tests.support.servers import HOST, free_port
from workerkit.engines.rq.startup import retry_delays, wait_for_redis
from workerkit.errors import StoreUnavailable


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def never_built() -> object:
    raise AssertionError("built without Redis")


def test_delays_double_from_half_a_second_up_to_five() -> None:
    delays = retry_delays()
    assert [next(delays) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_unreachable_redis_is_retried_until_the_budget_then_store_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeTime()
    url = f"redis://{HOST}:{free_port()}/0"  # nothing listens there
    with caplog.at_level(logging.INFO), pytest.raises(StoreUnavailable, match="ConnectionError"):
        wait_for_redis(url, never_built, 20.0, clock=fake.clock, sleep=fake.sleep)
    assert fake.slept == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 2.5]  # the last one ends at the budget
    retries = [r for r in caplog.records if getattr(r, "event", None) == "store_connect_retry"]
    assert [getattr(r, "retry_in", None) for r in retries] == fake.slept
    assert all(r.levelno == logging.WARNING for r in retries)
    assert "retrying in 0.5 s" in retries[0].getMessage()
    assert "ConnectionError" in retries[0].getMessage()
    gave_up = [r for r in caplog.records if getattr(r, "event", None) == "store_unavailable"]
    assert len(gave_up) == 1
    assert gave_up[0].levelno == logging.ERROR


def test_returns_the_worker_at_once_when_redis_answers(redis_url: str) -> None:
    fake = FakeTime()
    assert wait_for_redis(redis_url, lambda: "worker", 5.0, sleep=fake.sleep) == "worker"
    assert fake.slept == []


def test_a_worker_that_cannot_be_built_for_want_of_redis_is_retried(redis_url: str) -> None:
    fake = FakeTime()
    calls: list[int] = []

    def build() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis.exceptions.ConnectionError("Redis went away")
        return "worker"

    assert wait_for_redis(redis_url, build, 10.0, clock=fake.clock, sleep=fake.sleep) == "worker"
    assert fake.slept == [0.5, 1.0]


def test_other_errors_are_not_retried(redis_url: str) -> None:
    def build() -> str:
        raise redis.exceptions.ResponseError("WRONGTYPE")

    with pytest.raises(redis.exceptions.ResponseError):
        wait_for_redis(redis_url, build, 10.0, sleep=FakeTime().sleep)
