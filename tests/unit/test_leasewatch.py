"""The lease deadline a worker shares with the processes it forks (engines/leasewatch.py)."""

from __future__ import annotations

import time

from workerkit.engines.leasewatch import LeaseClock, now, since_monotonic


def test_a_renewal_sent_on_the_monotonic_clock_sets_the_deadline_on_the_shared_clock() -> None:
    clock = LeaseClock(3.0)
    assert clock.left() is None
    assert not clock.expiring()
    clock.extend(since_monotonic(time.monotonic() - 1.0))  # a renewal sent a second ago
    assert 1.9 < (clock.left() or 0) <= 2.0
    assert not clock.expiring()
    clock.extend(now() - 2.5)  # 0.5 s left: under ttl / 4
    assert clock.expiring()
    assert (clock.stop_at, clock.raise_at, clock.kill_at) == (0.75, 0.375, 0.1875)
