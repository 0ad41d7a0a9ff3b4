"""Building a :class:`~workerkit.scheduler.contract.Schedule` from what a user declares.

Shared by every engine's declaration API (``App.periodic``/``App.schedule`` on the SQL engine):
one place refuses a bad declaration at import time, with the schedule's name and the fix,
instead of the scheduler failing at its first fire.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from workerkit.errors import ConfigurationError
from workerkit.scheduler.contract import MISFIRE_POLICIES, Misfire, Schedule, Trigger

__all__ = ("make_schedule", "make_trigger")


def make_trigger(
    name: str, *, cron: str | None, every: float | None, timezone: str | None
) -> Trigger:
    """``Cron(cron, timezone=...)`` or ``Every(every)``; ConfigurationError naming ``name``."""
    from workerkit.scheduler.triggers import Cron, Every

    if (cron is None) == (every is None):
        raise ConfigurationError(
            f"schedule {name!r}: give cron='*/5 * * * *' or every=SECONDS (exactly one)"
        )
    try:
        if cron is not None:
            return Cron(cron, timezone=timezone) if timezone else Cron(cron)
        if timezone is not None:
            raise ConfigurationError(
                f"schedule {name!r}: timezone= applies to cron schedules only; every={every} "
                "counts seconds from the epoch, the same in every time zone"
            )
        if isinstance(every, bool) or not isinstance(every, int | float) or not every > 0:
            raise ConfigurationError(
                f"schedule {name!r}: every= is a number of seconds above 0, got {every!r}"
            )
        return Every(float(every))
    except ConfigurationError:
        raise
    except (ValueError, KeyError, TypeError) as exc:  # croniter's and zoneinfo's errors
        what = f"cron={cron!r}" if cron is not None else f"every={every!r}"
        zone = f", timezone={timezone!r}" if timezone else ""
        raise ConfigurationError(
            f"schedule {name!r}: {what}{zone} is not valid ({type(exc).__name__}: {exc}); a cron "
            "expression has five fields (minute hour day month weekday), a time zone is an "
            "IANA name such as 'Europe/Berlin'"
        ) from None


def make_schedule(
    name: str,
    task: str,
    *,
    cron: str | None = None,
    every: float | None = None,
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
    trigger = make_trigger(name, cron=cron, every=every, timezone=timezone)
    if misfire not in MISFIRE_POLICIES:
        raise ConfigurationError(
            f"schedule {name!r}: misfire={misfire!r}; use one of {', '.join(MISFIRE_POLICIES)}"
        )
    if isinstance(max_catch_up, bool) or not isinstance(max_catch_up, int) or max_catch_up < 1:
        raise ConfigurationError(
            f"schedule {name!r}: max_catch_up is a whole number of fires, at least 1; got "
            f"{max_catch_up!r}"
        )
    if misfire_grace is not None and not misfire_grace > 0:
        raise ConfigurationError(
            f"schedule {name!r}: misfire_grace is seconds above 0 (or None for the "
            f"scheduler_misfire_grace setting); got {misfire_grace!r}"
        )
    try:
        json.dumps([list(args), dict(kwargs or {})], allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"schedule {name!r}: args and kwargs must be JSON (str, int, float, bool, None, "
            f"list, dict): {exc}"
        ) from None
    return Schedule(
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
