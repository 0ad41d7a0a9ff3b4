"""Building a :class:`~workerkit.scheduler.contract.Schedule` from what a user declares.

Used by the SQL engine's ``App.periodic``/``App.schedule`` (``RqApp`` checks its own: its
arguments may be for a pickle serializer): one place refuses a bad declaration at import time,
with the schedule's name and the fix, instead of the scheduler failing at its first fire.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from workerkit.errors import ConfigurationError
from workerkit.scheduler.contract import Misfire, Schedule, Trigger
from workerkit.scheduler.plan import validate_schedule

__all__ = ("make_schedule", "make_trigger")


def make_trigger(
    name: str,
    *,
    cron: str | None,
    every: float | timedelta | None,
    timezone: str | None,
    anchor: float | None = None,
) -> Trigger:
    """:func:`~workerkit.scheduler.triggers.trigger_from`, its error naming the schedule."""
    from workerkit.scheduler.triggers import trigger_from

    try:
        return trigger_from(cron=cron, every=every, timezone=timezone, anchor=anchor)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"schedule {name!r}: {exc}") from None


def make_schedule(
    name: str,
    task: str,
    *,
    cron: str | None = None,
    every: float | timedelta | None = None,
    anchor: float | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timezone: str | None = None,
    queue: str | None = None,
    options: Mapping[str, Any] | None = None,
    misfire: Misfire = "latest",
    max_catch_up: int = 100,
    misfire_grace: float | None = None,
) -> Schedule:
    """A checked :class:`Schedule`: one trigger, a known misfire policy, JSON arguments."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"a schedule needs a name (a non-empty string), got {name!r}")
    trigger = make_trigger(name, cron=cron, every=every, timezone=timezone, anchor=anchor)
    try:
        json.dumps([list(args), dict(kwargs or {})], allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"schedule {name!r}: args and kwargs must be JSON (str, int, float, bool, None, "
            f"list, dict): {exc}"
        ) from None
    schedule = Schedule(
        name=name,
        task=task,
        trigger=trigger,
        args=tuple(args),
        kwargs=dict(kwargs or {}),
        queue=queue,
        options=dict(options or {}),
        misfire=misfire,
        max_catch_up=max_catch_up,
        misfire_grace=misfire_grace,
    )
    try:
        validate_schedule(schedule)
    except ValueError as exc:  # it names the schedule and the argument
        raise ConfigurationError(str(exc)) from None
    return schedule
