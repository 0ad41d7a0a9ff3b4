"""Reading RQ's keys for the dashboard: where each state lives, keyset cursors, job rows.

Each state is one Redis key per queue: waiting the queue list (``rq:queue:<q>``, run order),
scheduled RQ's ScheduledJobRegistry (by due time; workerkit's deferred jobs are there too),
running the StartedJobRegistry, failed and finished their registries (newest first). A cursor
names the last entry shown (its score and member, or its list index and id) and the next page
starts after that entry wherever it is now, so jobs moving between two pages cause no gap.
Nothing here decodes a payload with anything but a serializer that cannot run code.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from rq.job import Job
from rq.utils import utcparse

from workerkit.dashboard.model import JobRow, JobState
from workerkit.engines.rq.jobs import META_KEY, safe_func_name

if TYPE_CHECKING:
    import redis

__all__ = (
    "BATCH",
    "CURSOR_BACKUPS",
    "ERROR_STATES",
    "ROW_FIELDS",
    "STATE_OF_STATUS",
    "TEXT_CAP",
    "VERSION_FIELDS",
    "Entry",
    "Source",
    "build_row",
    "cap",
    "decode_cursor",
    "encode_cursor",
    "entries",
    "epoch",
    "error_of",
    "key_for",
    "last_line",
    "latest_result",
    "restored",
    "rq_time",
    "task_of",
    "text",
    "version_of",
    "wk_state",
)

#: Entries read per round trip while a page is filled.
BATCH: Final = 100
#: Every text of a job detail is cut to this many characters (a note says so).
TEXT_CAP: Final = 64 * 1024
#: The dashboard's state of each RQ job status (canceled and stopped jobs are failed ones).
STATE_OF_STATUS: Final[Mapping[str, JobState]] = {
    "queued": "waiting",
    "scheduled": "scheduled",
    "deferred": "scheduled",
    "started": "running",
    "failed": "failed",
    "stopped": "failed",
    "canceled": "failed",
    "finished": "finished",
}
#: The job hash fields the fence compares, in ``dash_version.lua``'s order.
VERSION_FIELDS: Final = (b"status", b"enqueued_at", b"started_at", b"ended_at")
#: The job hash fields a list row reads (HMGET, never the whole hash): ``data`` for the task
#: name (RQ keeps it only there), never ``result`` or ``meta``; ``exc_info`` only where a row
#: shows an error (:data:`ERROR_STATES`).
ROW_FIELDS: Final = (
    *VERSION_FIELDS,
    b"origin",
    b"worker_name",
    b"created_at",
    b"data",
    META_KEY.encode(),
)
#: The states whose rows show the error's last line (and so read ``exc_info`` and the result).
ERROR_STATES: Final = ("failed", "scheduled")


@dataclass(frozen=True)
class Source:
    """Where one state of one queue lives: a list, or a sorted set read in one direction."""

    key: str
    kind: str  # "list" | "asc" | "desc"


def key_for(state: JobState, queue: str) -> Source:
    if state == "waiting":
        return Source(f"rq:queue:{queue}", "list")
    if state == "scheduled":
        return Source(f"rq:scheduled:{queue}", "asc")
    if state == "running":
        return Source(f"rq:wip:{queue}", "asc")
    if state == "failed":
        return Source(f"rq:failed:{queue}", "desc")
    return Source(f"rq:finished:{queue}", "desc")


def text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def cap(value: str | None) -> str | None:
    if value is None or len(value) <= TEXT_CAP:
        return value
    return value[:TEXT_CAP] + f"\n[cut at {TEXT_CAP} characters of {len(value)}]"


def epoch(raw: Any) -> float | None:
    """An RQ timestamp field (``2026-12-03T21:00:00.123456Z``) as epoch seconds."""
    if not raw:
        return None
    try:
        return utcparse(text(raw)).timestamp()
    except ValueError:
        return None


def rq_time(seconds: float) -> str:
    """Epoch seconds in RQ's timestamp format."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def version_of(raw: Mapping[bytes, bytes]) -> str:
    """The job as shown: what ``dash_version.lua`` compares."""
    return "|".join(text(raw.get(name, b"")) for name in VERSION_FIELDS)


# --- cursors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One entry of a state's key: its queue, position (list index or score) and member."""

    queue: str
    position: float
    member: str
    #: In a cursor of a list: the ids shown just before ``member`` (the last first), where the
    #: next page starts when ``member`` itself has left the list.
    before: tuple[str, ...] = ()

    def job_id(self, state: JobState) -> str:
        """The job the entry names (a StartedJobRegistry member is ``<job id>:<execution>``)."""
        return self.member.rpartition(":")[0] if state == "running" else self.member


#: How many ids shown before a list cursor's own it carries.
CURSOR_BACKUPS: Final = 5


def encode_cursor(entry: Entry, shown: Sequence[Entry] = ()) -> str:
    """A cursor after ``entry``; ``shown``: the page's entries, for a list's fallbacks."""
    before = [e.member for e in shown if e.queue == entry.queue and e is not entry]
    backups = before[::-1][:CURSOR_BACKUPS]
    fields = [entry.queue, entry.position, entry.member, backups]
    raw = json.dumps(fields, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> Entry | None:
    """A cursor back to its entry; None (the first page) for none or one that is not ours."""
    if not cursor:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        queue, position, member, before = json.loads(base64.urlsafe_b64decode(padded.encode()))
        entry = Entry(str(queue), float(position), str(member), tuple(str(b) for b in before))
    except (ValueError, TypeError):
        return None
    return entry if math.isfinite(entry.position) else None


def _list_start(connection: redis.Redis[Any], key: str, after: Entry | None) -> int:
    """After the cursor's id where it is now; if it left the list, after the last id shown
    before it that is still there; if none is, from the head (the jobs ahead of them ran
    first: a list is consumed from its head)."""
    if after is None:
        return 0
    for job_id in (after.member, *after.before):
        found = connection.lpos(key, job_id)
        if found is not None:
            return int(found) + 1
    return 0


def _zset_start(
    connection: redis.Redis[Any], key: str, descending: bool, after: Entry | None
) -> tuple[int, Entry | None]:
    """The index to read from, and the entry (score, member) still to skip up to, if any."""
    if after is None:
        return 0, None
    rank = (connection.zrevrank if descending else connection.zrank)(key, after.member)
    score = connection.zscore(key, after.member) if rank is not None else None
    if rank is not None and score == after.position:
        return int(rank) + 1, None
    # Gone or moved: start at its score's group and skip what sorts before or at it.
    if descending:
        return int(connection.zcount(key, f"({after.position}", "+inf")), after
    return int(connection.zcount(key, "-inf", f"({after.position}")), after


def _passed(score: float, member: str, skip: Entry, descending: bool) -> bool:
    """Whether (score, member) sorts after ``skip`` in the read direction."""
    if score != skip.position:
        return score < skip.position if descending else score > skip.position
    return member < skip.member if descending else member > skip.member


def entries(
    connection: redis.Redis[Any], source: Source, queue: str, after: Entry | None, batch: int
) -> Iterator[Entry]:
    """The entries of one state of one queue after ``after`` (in this queue), in page order."""
    if source.kind == "list":
        start = _list_start(connection, source.key, after)
        while True:
            ids = connection.lrange(source.key, start, start + batch - 1)
            for offset, raw in enumerate(ids):
                yield Entry(queue, float(start + offset), text(raw))
            if len(ids) < batch:
                return
            start += batch
    descending = source.kind == "desc"
    start, skip = _zset_start(connection, source.key, descending, after)
    read = connection.zrevrange if descending else connection.zrange
    while True:
        members = read(source.key, start, start + batch - 1, withscores=True)
        for raw, score in members:
            member = text(raw)
            if skip is not None:
                if not _passed(float(score), member, skip, descending):
                    continue
                skip = None
            yield Entry(queue, float(score), member)
        if len(members) < batch:
            return
        start += batch


# --- rows -----------------------------------------------------------------------------------


def wk_state(raw: Mapping[bytes, bytes]) -> dict[str, Any]:
    value = raw.get(META_KEY.encode())
    if not value:
        return {}
    try:
        state = json.loads(value)
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


def restored(connection: redis.Redis[Any], job_id: str, raw: Any, serializer: Any) -> Job | None:
    """RQ's job object of a hash (payload decoded lazily, with ``serializer``); None when RQ
    cannot restore it."""
    job = Job(id=job_id, connection=connection, serializer=serializer)
    try:
        job.restore(raw)
    except Exception:
        return None
    return job


def task_of(job: Job | None) -> str:
    if job is None:
        return "(unreadable job hash)"
    try:
        name = safe_func_name(job)
    except Exception:
        name = None
    return name or "(undecodable payload)"


def latest_result(raw: Mapping[bytes, bytes] | None) -> tuple[int, str | None, bytes | None]:
    """The latest result's type (RQ's Result.Type value, 0: none), error and raw return value."""
    if not raw:
        return 0, None, None
    kind = int(text(raw.get(b"type", b"0")) or 0)
    error = None
    if exc := raw.get(b"exc_string"):
        try:
            error = zlib.decompress(base64.b64decode(exc)).decode("utf-8", "replace")
        except (ValueError, zlib.error):
            error = text(exc)
    value = raw.get(b"return_value")
    return kind, error, base64.b64decode(value) if value else None


def error_of(raw: Mapping[bytes, bytes], result: Mapping[bytes, bytes] | None) -> str | None:
    """The job's error: the hash's ``exc_info`` (a cancel's reason, older RQ), else the latest
    result's when it is a failure."""
    exc_info = raw.get(b"exc_info")
    if exc_info:
        try:
            return zlib.decompress(exc_info).decode("utf-8", "replace")
        except zlib.error:
            return text(exc_info)
    kind, error, _ = latest_result(result)
    return error if kind in (2, 3) else None


def last_line(error: str | None) -> str | None:
    if not error:
        return None
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def build_row(
    *,
    job_id: str,
    raw: Mapping[bytes, bytes],
    state: JobState,
    job: Job | None,
    position: float | None,
    lease_ms: int | None,
    result: Mapping[bytes, bytes] | None,
    now: float,
) -> JobRow:
    """One row from a job hash (and, where they apply, its registry score, lease, result)."""
    wk = wk_state(raw)
    attempts = wk.get("attempts")
    error = last_line(error_of(raw, result)) if state in ERROR_STATES else None
    run_at = None
    if state == "scheduled":
        run_at = position
    elif state == "running":
        run_at = epoch(raw.get(b"started_at"))
    return JobRow(
        id=job_id,
        queue=text(raw.get(b"origin", b"")),
        task=task_of(job),
        state=state,
        attempt=int(attempts) if isinstance(attempts, int) else (1 if state == "running" else 0),
        max_attempts=wk.get("max_attempts") if isinstance(wk.get("max_attempts"), int) else None,
        enqueued_at=epoch(raw.get(b"enqueued_at")),
        run_at=run_at,
        finished_at=epoch(raw.get(b"ended_at")),
        worker=text(raw[b"worker_name"]) if raw.get(b"worker_name") else None,
        lease_expires_at=now + lease_ms / 1000 if lease_ms is not None and lease_ms > 0 else None,
        has_checkpoint=wk.get("checkpoint") is not None,
        error=error,
        version=version_of(raw),
    )
