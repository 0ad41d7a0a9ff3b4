"""How the pages show numbers and times (Jinja filters), and what each page's table is made of.

Times are the store's epoch seconds, shown as durations relative to the store's clock ("12 s
ago", "in 3 min") with the UTC time in a tooltip; counts an engine cannot afford are "n/a".
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    from workerkit.dashboard.model import JobRow
    from workerkit.engines.presence import Presence

__all__ = (
    "JOB_ACTIONS",
    "WorkerView",
    "count",
    "duration",
    "filters",
    "iso",
    "job_actions",
    "job_url",
    "query_url",
    "worker_views",
)

#: The actions a job in each state offers: (action, label, what it does).
JOB_ACTIONS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "failed": (
        ("retry", "Retry", "back to waiting, due now, with a fresh attempt count"),
        ("discard", "Discard", "deleted for good"),
    ),
    "waiting": (("cancel", "Cancel", "taken off its queue: failed, cancelled by you"),),
    "scheduled": (("cancel", "Cancel", "taken off its queue: failed, cancelled by you"),),
}


def job_actions(state: str) -> tuple[tuple[str, str, str], ...]:
    return JOB_ACTIONS.get(state, ())


def count(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def duration(seconds: float | None) -> str:
    """``850 ms``, ``12 s``, ``3 min``, ``2.5 h``, ``3 d``; empty for None."""
    if seconds is None:
        return ""
    value = abs(seconds)
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    if value < 172800:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.0f} d"


def ago(at: float | None, now: float) -> str:
    if at is None:
        return ""
    return f"{duration(now - at)} ago" if now >= at else f"in {duration(at - now)}"


def until(at: float | None, now: float) -> str:
    if at is None:
        return ""
    return f"in {duration(at - now)}" if at >= now else f"{duration(now - at)} ago"


def iso(at: float | None) -> str:
    if at is None:
        return ""
    moment = dt.datetime.fromtimestamp(at, dt.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def query_url(path: str, **params: Any) -> str:
    """``path?k=v`` with the non-empty parameters."""
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return f"{path}?{urlencode(kept)}" if kept else path


@dataclass(frozen=True)
class WorkerView:
    """A presence as the workers page shows it: "lost" once older than its ttl."""

    presence: Presence
    state: str
    seen_ago: float


def worker_views(presences: Sequence[Presence], now: float) -> list[WorkerView]:
    views = [
        WorkerView(p, "lost" if p.lost(now) else p.state, now - p.heartbeat_at) for p in presences
    ]
    order = {"draining": 0, "releasing": 1, "starting": 2, "ready": 3, "lost": 4, "stopped": 5}
    return sorted(views, key=lambda v: (order.get(v.state, 9), v.presence.worker_id))


def job_url(job: JobRow | str) -> str:
    return f"/jobs/{quote(job if isinstance(job, str) else job.id, safe='')}"


def filters() -> dict[str, Any]:
    """The Jinja filters and globals the templates use."""
    return {
        "count": count,
        "duration": duration,
        "iso": iso,
        "ago": ago,
        "until": until,
        "query_url": query_url,
        "job_actions": job_actions,
        "job_url": job_url,
    }
