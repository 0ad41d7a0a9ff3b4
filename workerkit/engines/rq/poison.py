"""Queue entries the worker cannot read: failed with the reason, or dead-lettered; never a crash.

An entry that names no job hash goes with the reason to the dead-letter list :func:`dead_key`;
a job hash that does not restore is failed as RQ fails one, written field by field. What is
refused and what the operator sees: docs/engines/rq.md ("Poison entries").
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import TYPE_CHECKING, Any, Final

from rq.defaults import DEFAULT_FAILURE_TTL
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.results import Result
from rq.utils import current_timestamp, now, utcformat

if TYPE_CHECKING:
    import redis

__all__ = ("DEAD_PREFIX", "dead_key", "dead_letter", "describe_entry", "fail_unreadable")

#: The dead-letter list of a queue: ``workerkit:rq:dead:<queue>``, one JSON object per entry
#: (``entry``: the raw entry, base64; ``text``: it, readable; ``queue``, ``reason``, ``worker``,
#: ``at``), oldest first.
DEAD_PREFIX: Final = "workerkit:rq:dead:"
#: How much of an entry a log line or a reason quotes.
_QUOTED: Final = 120


def dead_key(queue: str) -> str:
    """The dead-letter list of ``queue``."""
    return DEAD_PREFIX + queue


def describe_entry(raw: bytes) -> str:
    """A queue entry as readable text (undecodable bytes escaped), cut for a log line."""
    text = raw.decode("utf-8", "backslashreplace")
    return text if len(text) <= _QUOTED else text[:_QUOTED] + "..."


def dead_letter(
    connection: redis.Redis[Any], queue: str, raw: bytes, reason: str, worker: str
) -> str:
    """Append ``raw`` (an entry popped from ``queue``) and why to the queue's dead-letter list.

    Returns the list's key.
    """
    record = {
        "entry": base64.b64encode(raw).decode("ascii"),
        "text": describe_entry(raw),
        "queue": queue,
        "reason": reason,
        "worker": worker,
        "at": utcformat(now()),
    }
    key = dead_key(queue)
    connection.rpush(key, json.dumps(record, separators=(",", ":")))
    return key


def fail_unreadable(
    connection: redis.Redis[Any],
    job_id: str,
    queue: str,
    reason: str,
    *,
    worker: str,
    serializer: Any = None,
) -> None:
    """Fail a job whose hash exists but does not restore, as RQ fails a job, without reading it.

    Its status, ``exc_info`` and end time are written into the hash (its other fields stay, for
    whoever looks into it), it expires as a failed job does, and it joins the queue's
    FailedJobRegistry with a failure result naming ``reason``.
    """
    key = Job.key_for(job_id)
    with connection.pipeline() as pipeline:
        pipeline.hset(
            key,
            mapping={
                "status": JobStatus.FAILED.value,
                "exc_info": zlib.compress(reason.encode("utf-8")),
                "ended_at": utcformat(now()),
            },
        )
        pipeline.expire(key, DEFAULT_FAILURE_TTL)
        registry = FailedJobRegistry(queue, connection=connection)
        pipeline.zadd(registry.key, {job_id: current_timestamp() + DEFAULT_FAILURE_TTL})
        Result(
            job_id=job_id,
            type=Result.Type.FAILED,
            connection=connection,
            exc_string=reason,
            worker_name=worker,
            serializer=serializer,
        ).save(ttl=DEFAULT_FAILURE_TTL, pipeline=pipeline)  # type: ignore[no-untyped-call]
        pipeline.execute()
