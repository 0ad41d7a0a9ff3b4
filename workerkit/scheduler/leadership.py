"""Leader election timing (client-go's model), pure: the caller passes the time in.

A standby tries to acquire every retry period (jittered a little, so replicas do not retry in
lockstep); the leader renews every retry period; a leader whose last successful renewal
*started* more than the renew deadline ago stops leading, before its lease (longer) can
expire at the store and let another replica in. The epoch fences the store's writes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from workerkit.scheduler.contract import Lease
    from workerkit.scheduler.plan import SchedulerTiming

__all__ = ("Change", "Leadership")

Change = Literal["gained", "lost"] | None


class Leadership:
    """Whether this replica leads, and when it must next talk to the store.

    ``jitter()`` returns a number in [0, 1); a standby retries after
    ``retry_period * (1 - 0.2 * jitter())``, so a released lease is taken within one period.
    """

    def __init__(
        self, timing: SchedulerTiming, *, jitter: Callable[[], float] = random.random
    ) -> None:
        self.timing = timing
        self.lease: Lease | None = None
        self._jitter = jitter
        self._renewed_at = -math.inf  # local time the last successful call started
        self._next_call = -math.inf  # no call made yet: due at once

    @property
    def leading(self) -> bool:
        """True while this replica holds a lease it renewed within the deadline."""
        return self.lease is not None

    def next_call(self) -> float:
        """When to call the store next (acquire or renew)."""
        return self._next_call

    def deadline(self) -> float:
        """When leadership ends unless renewed (inf when not leading)."""
        return self._renewed_at + self.timing.renew_deadline if self.lease else math.inf

    def call_due(self, now: float) -> Literal["acquire", "renew"] | None:
        """The store call due at ``now``, if any."""
        if now < self._next_call:
            return None
        return "renew" if self.lease is not None else "acquire"

    def expired(self, now: float) -> bool:
        """True when leading but the renew deadline has passed: stop firing now."""
        return self.lease is not None and now >= self.deadline()

    def answered(self, started: float, lease: Lease | None) -> Change:
        """The store answered an acquire/renew call made at ``started``."""
        before = self.lease
        self.lease = lease
        if lease is not None:
            self._renewed_at = started
            self._next_call = started + self.timing.retry_period
        else:
            self._next_call = started + self._standby_period()
        if before is None and lease is not None:
            return "gained"
        if before is not None and (lease is None or lease.epoch != before.epoch):
            return "lost" if lease is None else "gained"
        return None

    def failed(self, started: float) -> None:
        """The call made at ``started`` could not reach the store: try again a period later."""
        self._next_call = started + self.timing.retry_period

    def step_down(self, now: float) -> Lease | None:
        """Stop leading (deadline passed, NOT_LEADER, stop); returns the lease that was held."""
        lease, self.lease = self.lease, None
        self._renewed_at = -math.inf
        self._next_call = max(self._next_call, now + self._standby_period())
        return lease

    def _standby_period(self) -> float:
        return self.timing.retry_period * (1 - 0.2 * self._jitter())
