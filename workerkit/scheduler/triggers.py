"""When schedules fire: :class:`Cron` (croniter's calendar math in a zoneinfo time zone) and
:class:`Every` (every N seconds, aligned to an anchor so every replica computes the same times).

Pure functions of epoch seconds. Across DST changes a local time that does not exist fires once,
at the first instant after the gap; a local time that occurs twice fires once, the first time.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

if TYPE_CHECKING:
    from workerkit.scheduler.contract import Trigger

__all__ = ("Cron", "Every", "trigger_from", "upcoming")

# Wall-clock candidates a single next/previous step may skip: those that fall inside a DST
# fold's second pass or a gap's collapsed range. Far more than any real zone needs.
_MAX_SKIPPED = 100_000
_RANDOM = re.compile(r"(^|[\s,/-])R($|[\s,/(-])", re.IGNORECASE)  # croniter's random field
_MAX_DST_SHIFT = timedelta(hours=3)  # larger than any zone's DST shift (Antarctica/Troll: 2 h)


@dataclass(frozen=True)
class Every:
    """Every ``seconds`` seconds, at ``anchor + k * seconds`` (epoch seconds, any integer k,
    rounded to whole milliseconds).

    The anchor (default 0: the Unix epoch) pins the grid, so two replicas started at different
    moments fire at the same times: ``Every(60)`` fires on every whole UTC minute.
    """

    seconds: float
    anchor: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds >= 0.001):
            raise ValueError(
                f"every={self.seconds!r}: give the interval in seconds, at least 0.001"
            )
        if not math.isfinite(self.anchor):
            raise ValueError(f"anchor={self.anchor!r}: give epoch seconds (a finite number)")

    def _at(self, k: int) -> float:
        # Whole milliseconds (as fire keys are), so a time read back from a store is the
        # same number, and ``next_after`` of a fire time never names that time again.
        return round(self.anchor + k * self.seconds, 3)

    def next_after(self, after: float) -> float:
        """The first ``anchor + k * seconds`` strictly after ``after``."""
        k = math.floor((after - self.anchor) / self.seconds) + 1
        while self._at(k) <= after:  # float rounding at a grid point
            k += 1
        while self._at(k - 1) > after:
            k -= 1
        return self._at(k)

    def previous_before(self, before: float) -> float:
        """The last ``anchor + k * seconds`` strictly before ``before``."""
        k = math.ceil((before - self.anchor) / self.seconds) - 1
        while self._at(k) >= before:
            k -= 1
        while self._at(k + 1) < before:
            k += 1
        return self._at(k)

    def describe(self) -> str:
        """``every 10s`` (with the anchor when it is not the epoch)."""
        text = f"every {self.seconds:g}s"
        return text if self.anchor == 0 else f"{text} from {self.anchor:g}"

    def identity(self) -> str:
        """Changes exactly when the fire times change."""
        return f"every {self.seconds!r} anchor {self.anchor!r}"


@dataclass(frozen=True)
class Cron:
    """A five-field cron expression (or ``@hourly``, ``@daily``, ...) in a time zone.

    croniter does the calendar math on local wall-clock times (day-of-month and day-of-week
    are OR-ed, as in Vixie cron); this class maps each wall time to an instant: a time skipped
    by a DST gap fires at the first instant after the gap (several skipped times fire once), a
    time that occurs twice fires at its first occurrence only.
    """

    expression: str
    timezone: str = "UTC"
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)
    _iter: croniter = field(init=False, repr=False, compare=False)
    _lock: threading.Lock = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        expression = " ".join(self.expression.split())
        fields = expression.split(" ")
        if not expression.startswith("@") and len(fields) != 5:
            raise ValueError(
                f"cron={self.expression!r}: give five fields (minute hour day month weekday),"
                " e.g. '*/5 * * * *'; for intervals under a minute use every=SECONDS"
            )
        if _RANDOM.search(expression):
            raise ValueError(
                f"cron={self.expression!r}: 'R' (a random time) is refused: every replica must"
                " compute the same fire times; write the minute or hour you want"
            )
        if not croniter.is_valid(expression):
            raise ValueError(
                f"cron={self.expression!r} is not a valid cron expression;"
                " e.g. '*/5 * * * *' or '0 3 * * mon-fri'"
            )
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"timezone={self.timezone!r} is not a known IANA time zone;"
                " give a name such as 'UTC' or 'Europe/Berlin'"
            ) from exc
        object.__setattr__(self, "expression", expression)
        object.__setattr__(self, "_zone", zone)
        start = datetime(2000, 1, 1)
        object.__setattr__(self, "_iter", croniter(expression, start))
        object.__setattr__(self, "_lock", threading.Lock())
        try:  # the syntax can be valid and name no date at all ("0 0 30 2 *")
            self.next_after(time.time())
        except ValueError:
            raise ValueError(
                f"cron={self.expression!r} never fires (no such date, e.g. February 30 or"
                " April 31); check the day-of-month and month fields"
            ) from None

    def _wall(self, instant: float) -> datetime:
        return datetime.fromtimestamp(instant, self._zone).replace(tzinfo=None)

    def _instant(self, wall: datetime) -> float:
        """The instant a wall-clock fire time means (first occurrence; gap -> its end)."""
        first = wall.replace(tzinfo=self._zone).timestamp()  # fold=0: the first occurrence
        if self._wall(first) == wall:
            return first
        # Not a local time (a DST gap): fold=0 and fold=1 land on either side of the
        # transition; find it to the second (transitions are whole seconds).
        other = wall.replace(tzinfo=self._zone, fold=1).timestamp()
        lo, hi = math.floor(min(first, other)), math.ceil(max(first, other))
        after = self._offset(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._offset(mid) == after:
                hi = mid
            else:
                lo = mid
        return float(hi)

    def _offset(self, instant: float) -> timedelta | None:
        return datetime.fromtimestamp(instant, UTC).astimezone(self._zone).utcoffset()

    def next_after(self, after: float) -> float:
        """The first fire time strictly after ``after``."""
        start = self._wall(math.floor(after)).replace(microsecond=0)
        with self._lock:
            self._iter.set_current(start, force=True)
            for _ in range(_MAX_SKIPPED):
                instant = self._instant(self._iter.get_next(datetime))
                if instant > after:
                    return instant
        raise ValueError(f"cron {self.expression!r}: no fire time found after {after}")

    def previous_before(self, before: float) -> float:
        """The last fire time strictly before ``before``."""
        local = datetime.fromtimestamp(math.ceil(before), self._zone)
        start = local.replace(tzinfo=None)
        if local.fold:  # in a repeated hour: later wall times of its first pass came earlier
            start += _MAX_DST_SHIFT
        with self._lock:
            self._iter.set_current(start + timedelta(seconds=1), force=True)
            for _ in range(_MAX_SKIPPED):
                instant = self._instant(self._iter.get_prev(datetime))
                if instant < before:
                    return instant
        raise ValueError(f"cron {self.expression!r}: no fire time found before {before}")

    def describe(self) -> str:
        """``cron '*/5 * * * *' Europe/Berlin``."""
        return f"cron '{self.expression}' {self.timezone}"

    def identity(self) -> str:
        """Changes exactly when the fire times change."""
        return f"cron {self.expression} tz {self.timezone}"


def trigger_from(
    *,
    cron: str | None = None,
    every: float | timedelta | None = None,
    timezone: str | None = None,
    anchor: float | None = None,
) -> Trigger:
    """The trigger ``App.periodic(...)``-style arguments describe: exactly one of ``cron`` or
    ``every`` (seconds or a timedelta); ``timezone`` for cron only; ``anchor`` for every only.

    Raises :class:`ValueError` naming the argument and the fix.
    """
    if (cron is None) == (every is None):
        raise ValueError("give exactly one of cron='*/5 * * * *' or every=SECONDS")
    if cron is not None:
        if anchor is not None:
            raise ValueError("anchor= applies to every=, not to cron=")
        return Cron(cron, timezone or "UTC")
    if timezone is not None:
        raise ValueError("timezone= applies to cron=, not to every= (intervals are absolute)")
    assert every is not None
    seconds = every.total_seconds() if isinstance(every, timedelta) else float(every)
    return Every(seconds, 0.0 if anchor is None else float(anchor))


def upcoming(trigger: Trigger, after: float, count: int) -> tuple[float, ...]:
    """The next ``count`` fire times strictly after ``after`` (for ``workerkit schedules``)."""
    times: list[float] = []
    for _ in range(count):
        after = trigger.next_after(after)
        times.append(after)
    return tuple(times)
