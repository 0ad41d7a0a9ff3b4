"""The rq worker riding out a Redis outage: the backoff, the lease bound, retried writes, and the
settling flag and last renewal its worker process shares with the forked work horse.

Real outages (Redis restarted, connections killed) are in tests/faults/test_rq_faults.py and
tests/e2e/test_rq_store_outage.py.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import redis.exceptions

from workerkit.engines.rq.leases import AttemptKeys
from workerkit.engines.rq.outage import Fenced, RetryUnreachable, backoff, lease_bound
from workerkit.engines.rq.state import Attempt

DOWN = redis.exceptions.ConnectionError(
    "Error 111 connecting to 127.0.0.1:6379. Connection refused."
)


class Clock:
    """A monotonic clock that the retries' sleeps move on."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def failing(times: int, then: Callable[[], Any], error: Exception = DOWN) -> Callable[[], Any]:
    left = [times]

    def write() -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise error
        return then()

    return write


def retry(clock: Clock, **kwargs: Any) -> RetryUnreachable:
    fields: dict[str, Any] = {"lease_until": lambda: 102.0, **kwargs}
    return RetryUnreachable("settle", "job-1", clock=clock, sleep=clock.sleep, **fields)


def test_backoff_doubles_from_50_ms_to_a_1_s_cap_with_jitter() -> None:
    top = backoff(rng=lambda: 1.0)
    assert [round(next(top), 3) for _ in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    bottom = backoff(rng=lambda: 0.0)
    assert [round(next(bottom), 3) for _ in range(3)] == [0.025, 0.05, 0.1]


def test_the_lease_bound_is_never_later_than_redis_s_expiry() -> None:
    assert lease_bound(100.0, 4.0) == pytest.approx(103.6)  # a tenth of the lease off ...
    assert lease_bound(100.0, 30.0) == pytest.approx(129.0)  # ... 1 s at most


def test_a_write_is_retried_until_redis_answers_and_its_return_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    heard: list[str] = []
    caplog.set_level(logging.INFO, logger="workerkit.engines.rq")
    result = retry(clock, on_failure=heard.append).run(failing(12, lambda: "landed"))
    assert result == "landed"
    assert len(clock.slept) == 12
    assert max(clock.slept) <= 1.0
    assert len(heard) == 12
    assert heard[0].startswith("settle failed: ConnectionError")
    events = [getattr(r, "event", None) for r in caplog.records]
    # The first failure, the first past the lease (it still lands if nobody took the job) ...
    assert events.count("store_write_retry") == 2
    assert "past the lease" in caplog.records[1].getMessage()
    # ... and the write that landed, with how many failures it took.
    recovered = [r for r in caplog.records if getattr(r, "event", None) == "store_write_recovered"]
    assert [getattr(r, "failures", None) for r in recovered] == [12]


def test_timeouts_are_retried_too() -> None:
    clock = Clock()
    timeout = redis.exceptions.TimeoutError("Timeout reading from socket")
    assert retry(clock).run(failing(2, lambda: 1, timeout)) == 1


def test_a_bounded_write_gives_up_at_its_bound_with_redis_s_error() -> None:
    clock = Clock()
    with pytest.raises(redis.exceptions.ConnectionError):
        retry(clock, until=lambda: 103.0).run(failing(1000, lambda: None))
    assert 103.0 <= clock.now < 104.1


def test_an_unbounded_write_stops_when_its_bound_says_so_at_once() -> None:
    clock = Clock()
    with pytest.raises(redis.exceptions.ConnectionError):
        retry(clock, until=lambda: -math.inf).run(failing(1000, lambda: None))
    assert clock.slept == []


def test_other_errors_and_the_fence_are_not_retried() -> None:
    clock = Clock()
    script_error = redis.exceptions.ResponseError("ERR Error running script")
    with pytest.raises(redis.exceptions.ResponseError):
        retry(clock).run(failing(1, lambda: None, script_error))

    def fenced() -> None:
        raise Fenced

    with pytest.raises(Fenced):
        retry(clock).run(failing(3, fenced))
    assert len(clock.slept) == 3  # the three outages, then the fence ends it


def test_the_work_horse_sees_its_worker_s_renewals_and_the_worker_its_settling() -> None:
    attempt = Attempt(
        keys=AttemptKeys("job-1", "token", "default"),
        task="t",
        number=1,
        started=1.0,
        run_limit=10,
        last_renewed=50.0,
    )
    attempt.share()
    try:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(write_end)
            os.read(read_end, 1)  # the parent renewed
            code = 0 if attempt.renewed_at() == 60.0 else 1
            attempt.mark_settling()
            os._exit(code)
        os.close(read_end)
        assert not attempt.settling
        attempt.renewed(60.0)
        os.write(write_end, b"x")
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # the child read the renewal
        assert attempt.settling  # and the parent its settling
    finally:
        attempt.unshare()
    # Kept after the horse is gone.
    assert attempt.renewed_at() == 60.0
    assert attempt.settling
