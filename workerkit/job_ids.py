"""Job ids that sort in the order this process made them.

A claim takes due jobs by ``run_at`` and starts them in ``(run_at, job id)`` order. SQLite's
clock has millisecond precision, so jobs enqueued one after another within a millisecond share
their ``run_at`` (on PostgreSQL, the rows of one ``enqueue_many`` statement do): with random
ids (``uuid4``), they started in a random order. An id here is 32 hex digits, as
``uuid4().hex`` was: the wall clock's milliseconds (48 bits), a per-process count (16 bits, so
that ids of one millisecond still sort in order; it wraps every 65,536 ids), and 64 random bits
(ids of different processes or hosts do not collide). Ids that different processes made in the
same millisecond sort in no particular order, as their enqueues happened in none.
"""

from __future__ import annotations

import itertools
import os
import time

__all__ = ("new_job_id",)

# next() on a count is atomic under the GIL: no lock, so nothing a fork could leave held.
_counter = itertools.count()


def new_job_id() -> str:
    """A new job id: 32 hex digits, increasing within this process (see the module)."""
    millis = time.time_ns() // 1_000_000
    count = next(_counter) & 0xFFFF
    return f"{millis & 0xFFFF_FFFF_FFFF:012x}{count:04x}{os.urandom(8).hex()}"
