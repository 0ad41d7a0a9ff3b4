"""The lease deadline a Celery worker shares with its pool children (engines/celery/lease.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("celery")

from workerkit.engines.celery.lease import LeaseClock, now


def test_the_lease_clock_stops_a_task_a_quarter_of_the_lease_before_it_expires() -> None:
    clock = LeaseClock(8.0)
    assert clock.left() is None
    assert not clock.expiring()
    clock.extend(now())
    assert 7.5 < (clock.left() or 0) <= 8.0
    assert not clock.expiring()
    clock.extend(now() - 6.5)  # 1.5 s left: under ttl / 4 = 2 s
    assert clock.expiring()
    assert (clock.stop_at, clock.raise_at, clock.kill_at) == (2.0, 1.0, 0.5)
