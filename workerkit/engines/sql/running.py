"""One job in the sql worker's hands: its delivery, deadlines, settle lock and interrupt gate.

Shared by the worker's threads: the job's own thread, and the main thread that may take it back
(release, timeout). Whoever holds :attr:`Running.lock` first settles the delivery, once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workerkit.engines.attempt import Rules
from workerkit.engines.sql.interrupts import Gate
from workerkit.errors import JobInterrupted

if TYPE_CHECKING:
    from workerkit.engines.base import Delivery
    from workerkit.events import Outcome
    from workerkit.job import JobContext

__all__ = ("RULES", "JobTimedOut", "PermanentFailure", "Running")


class JobTimedOut(BaseException):
    """Raised inside a job's thread when it passes its timeout."""


class PermanentFailure(Exception):
    """A job that cannot succeed on any attempt (unknown task, bad payload, non-JSON result)."""


#: How the sql worker's attempts end (docs/concepts/attempts.md). The main thread settles a
#: delivery before it interrupts the job's thread (release, timeout); a BaseException the job
#: raised itself (SystemExit...) is left to the delivery's lease.
RULES = Rules(
    interrupts=(JobInterrupted, JobTimedOut),
    permanent=(PermanentFailure,),
    settle_base_exceptions=False,
)


@dataclass(eq=False)
class Running:
    """A job being run: what its thread and the main thread share."""

    delivery: Delivery
    context: JobContext
    started: float  # monotonic
    deadline: float  # monotonic
    lease_from: float  # monotonic, sent time of the request that last set the lease
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while settling
    gate: Gate = field(default_factory=Gate)  # the main thread interrupts the body only
    settled_as: Outcome | None = None
    extend_failures: int = 0
    acked_by_claim: bool = False  # its ack goes with the fetcher's claim: no more renewals
