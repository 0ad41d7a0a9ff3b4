"""What is particular to workerkit.testing's queue and clock, and to SQL URL handling."""

from __future__ import annotations

import pytest

from workerkit.engines.base import NewJob, QueueBackend
from workerkit.engines.sql.db import normalize_url
from workerkit.errors import ConfigurationError, PayloadError
from workerkit.testing import InMemoryQueue, ManualClock


def test_manual_clock_moves_only_forward_when_told() -> None:
    clock = ManualClock(start=1000.0)
    assert clock() == 1000.0
    assert clock.advance(2.5) == 1002.5
    assert clock() == 1002.5
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)


def test_in_memory_queue_satisfies_the_backend_protocol() -> None:
    assert isinstance(InMemoryQueue(), QueueBackend)


def test_lease_expires_only_when_the_clock_passes_it() -> None:
    clock = ManualClock(start=0.0)
    queue = InMemoryQueue(lease_ttl=30, clock=clock)
    queue.enqueue(NewJob("j", "t", "default", "{}", max_attempts=3))
    [first] = queue.claim(["default"], "a", 1)
    assert first.lease_expires_at == 30.0

    clock.advance(30)  # expiry is strict: at exactly V the lease still holds
    assert queue.claim(["default"], "b", 1) == []
    clock.advance(0.001)
    [second] = queue.claim(["default"], "b", 1)
    assert second.attempt == 2


def test_delayed_job_becomes_due_when_the_clock_reaches_run_at() -> None:
    clock = ManualClock(start=0.0)
    queue = InMemoryQueue(clock=clock)
    queue.enqueue(NewJob("later", "t", "default", "{}", max_attempts=1, run_at=60.0))
    assert queue.claim(["default"], "w", 1) == []
    clock.advance(60)
    assert [d.job_id for d in queue.claim(["default"], "w", 1)] == ["later"]


def test_saved_values_are_copies_and_must_be_json() -> None:
    queue = InMemoryQueue()
    queue.enqueue(NewJob("j", "t", "default", "{}", max_attempts=1))
    [delivery] = queue.claim(["default"], "w", 1)
    state = {"items": [1]}
    queue.save_checkpoint(delivery, state)
    state["items"].append(2)
    job = queue.get_job("j")
    assert job is not None
    assert job["checkpoint"] == {"items": [1]}
    with pytest.raises(PayloadError):
        queue.save_checkpoint(delivery, {1, 2})


def test_purge_finished_and_health_switch() -> None:
    clock = ManualClock(start=0.0)
    queue = InMemoryQueue(clock=clock)
    queue.enqueue(NewJob("j", "t", "default", "{}", max_attempts=1))
    [delivery] = queue.claim(["default"], "w", 1)
    queue.ack(delivery, "ok")
    clock.advance(100)
    assert queue.purge_finished(200) == 0
    assert queue.purge_finished(50) == 1
    assert queue.get_job("j") is None

    assert queue.health().ok
    queue.healthy = False
    assert not queue.health().ok


def test_release_ref_rejects_something_that_is_not_a_ref() -> None:
    with pytest.raises(ValueError, match="job_id"):
        InMemoryQueue().release_ref({"job": "x"})


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u:p@db/jobs", "postgresql+psycopg"),
        ("postgres://u:p@db/jobs", "postgresql+psycopg"),
        ("postgresql+psycopg://u:p@db/jobs", "postgresql+psycopg"),
        ("sqlite:///jobs.sqlite3", "sqlite"),
    ],
)
def test_database_urls_are_normalized_to_supported_drivers(url: str, driver: str) -> None:
    assert normalize_url(url).drivername == driver


def test_unsupported_database_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigurationError, match="database_url"):
        normalize_url("mysql://u:p@db/jobs")
