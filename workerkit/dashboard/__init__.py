"""``workerkit dashboard``: a web view of queues, jobs, workers and schedules, with actions.

The engine-neutral read models and the source protocol are :mod:`workerkit.dashboard.model`; each
engine's source lives in ``workerkit.engines.<engine>.dashboard``. docs/howto/dashboard.md.
"""

from __future__ import annotations

__all__ = ()
