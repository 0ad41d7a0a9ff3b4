"""Job leases on Redis: the keys, the Lua scripts, and the fenced operations built on them.

Every attempt a workerkit RQ worker starts holds a *lease*: the key
``workerkit:rq:lease:<job id>`` whose value is ``<state>:<token>`` (the token is the RQ
execution id of the attempt) and whose TTL the worker renews every H seconds. The states:

``run``      the attempt is running; checkpoints are written only in this state;
``settle``   the attempt finished and its process is doing RQ's own bookkeeping (result, failed
             registry, retry); nobody else may touch the job meanwhile;
``release``  the worker took the job back from its work horse to release it (the horse is being
             stopped; its writes are fenced out from here on).

Beside RQ's StartedJobRegistry (``rq:wip:<queue>``), workerkit keeps its own sorted set
``workerkit:rq:started:<queue>`` of the ``<job id>:<token>`` members it started, so that crash
recovery only ever touches attempts that a workerkit worker started and leased: jobs that bare
``rq worker`` processes run on the same queue (during a migration) are left to RQ.

Why Lua: each change of hands (release, crash recovery, settle) must check the lease and move the
job in one atomic step. Two live workers that both find an abandoned job run the same script; the
first one's removes the member, so the second one's finds nothing to do, and the job is requeued
once. A script that finds the lease held by its attempt's token (``run:<token>``) never requeues
it: a job is never re-run while its first attempt still renews its lease.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

__all__ = (
    "LEASE_PREFIX",
    "STARTED_PREFIX",
    "AttemptKeys",
    "Leases",
    "deferred_key",
    "lease_key",
    "started_key",
)

LEASE_PREFIX: Final = "workerkit:rq:lease:"
STARTED_PREFIX: Final = "workerkit:rq:started:"
SCAN_LOCK_PREFIX: Final = "workerkit:rq:scan:"
WAKE_PREFIX: Final = "workerkit:rq:wake:"
DEFERRED_PREFIX: Final = "workerkit:rq:deferred:"
#: RQ's own scheduler lock of a queue (``rq.scheduler.SCHEDULER_LOCKING_KEY_TEMPLATE``).
RQ_SCHEDULER_LOCK_PREFIX: Final = "rq:scheduler-lock:"
#: At most this many deferred jobs are put back per queue and promotion (bounds the script).
PROMOTE_BATCH: Final = 100

#: How long a ``settle`` lease lives when its process dies half-way through RQ's bookkeeping:
#: after that, crash recovery treats the attempt as abandoned and requeues it.
SETTLE_TTL_MS: Final = 60_000


def lease_key(job_id: str) -> str:
    return LEASE_PREFIX + job_id


def started_key(queue: str) -> str:
    return STARTED_PREFIX + queue


def deferred_key(queue: str) -> str:
    return DEFERRED_PREFIX + queue


@dataclass(frozen=True)
class AttemptKeys:
    """The Redis keys one attempt of one job touches (RQ's own names, and workerkit's)."""

    job_id: str
    token: str  # the RQ execution id of this attempt
    queue: str

    @property
    def member(self) -> str:
        """The attempt's member in StartedJobRegistry and in workerkit's started set."""
        return f"{self.job_id}:{self.token}"

    def keys(self) -> list[str]:
        """KEYS of the scripts below, in their order."""
        return [
            lease_key(self.job_id),
            f"rq:wip:{self.queue}",
            started_key(self.queue),
            f"rq:job:{self.job_id}",
            f"rq:queue:{self.queue}",
            f"rq:execution:{self.job_id}:{self.token}",
            f"rq:executions:{self.job_id}",
        ]

    def defer_keys(self) -> list[str]:
        """KEYS of ``_DEFER``: :meth:`keys`, RQ's ScheduledJobRegistry, workerkit's deferred set."""
        return [*self.keys(), f"rq:scheduled:{self.queue}", deferred_key(self.queue)]

    def ref(self) -> dict[str, Any]:
        """The delivery ref the supervisor keeps (and passes back to ``release_in_flight``)."""
        return {"job_id": self.job_id, "token": self.token, "queue": self.queue}


# The lease check shared by the scripts: ARGV[1] is the token, ARGV[2] the accepted states as
# "|run|release|" ("none" accepts a missing lease). Returns 1 when owned, 0 when another attempt
# holds the lease or the state is not accepted.
_OWNED = """
local function owned(lease, token, accepted)
  if not lease then
    return string.find(accepted, '|none|', 1, true) ~= nil
  end
  local sep = string.find(lease, ':', 1, true)
  if not sep then return false end
  local state = string.sub(lease, 1, sep - 1)
  if string.sub(lease, sep + 1) ~= token then return false end
  return string.find(accepted, '|' .. state .. '|', 1, true) ~= nil
end
"""

#: Renew the lease while it is this attempt's, whatever its state.
_RENEW = """
local lease = redis.call('GET', KEYS[1])
if lease and string.sub(lease, -(#ARGV[1] + 1)) == ':' .. ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

#: Write the job's meta (a checkpoint) only while the attempt runs.
_WRITE_META = """
if redis.call('GET', KEYS[1]) == 'run:' .. ARGV[1] then
  redis.call('HSET', KEYS[2], 'meta', ARGV[2])
  return 1
end
return 0
"""

#: Move the lease to another state. KEYS: lease, started set. ARGV: token, accepted, new state,
#: ttl ms, member. Only while the attempt is still a started member (not settled already).
_TRANSITION = (
    _OWNED
    + """
local lease = redis.call('GET', KEYS[1])
if not owned(lease, ARGV[1], ARGV[2]) then return 0 end
if redis.call('ZSCORE', KEYS[2], ARGV[5]) == false then return 0 end
redis.call('SET', KEYS[1], ARGV[3] .. ':' .. ARGV[1], 'PX', ARGV[4])
return 1
"""
)

#: The fenced start of a change of hands, shared by _REQUEUE and _DEFER: return 0 unless this
#: attempt owns the lease and is still started; then take it out of the started registries and
#: write its new meta. KEYS and ARGV[1..4] as theirs.
_LEAVE_STARTED = (
    _OWNED
    + """
local lease = redis.call('GET', KEYS[1])
if not owned(lease, ARGV[1], ARGV[2]) then return 0 end
if redis.call('ZSCORE', KEYS[3], ARGV[3]) == false then
  if lease then redis.call('DEL', KEYS[1]) end
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[6])
redis.call('ZREM', KEYS[7], ARGV[1])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], 'meta', ARGV[4]) end
"""
)

#: Put the job back at the front of its queue, out of the started registries, lease dropped.
#: KEYS: AttemptKeys.keys(). ARGV: token, accepted, member, new meta ('' keeps it), job id.
#: Returns 1 when requeued; 0 when another attempt owns the job or this one was settled already
#: (a leftover lease of a settled attempt is dropped).
_REQUEUE = (
    _LEAVE_STARTED
    + """
redis.call('HSET', KEYS[4], 'status', 'queued')
redis.call('LPUSH', KEYS[5], ARGV[5])
redis.call('DEL', KEYS[1])
return 1
"""
)

#: Not now: like ``_REQUEUE``, but into RQ's ScheduledJobRegistry at ARGV[6] (epoch seconds),
#: status ``scheduled``, and into workerkit's deferred set (the jobs ``_PROMOTE`` may put back).
#: KEYS: AttemptKeys.defer_keys(). ARGV: token, accepted, member, new meta, job id, run at.
_DEFER = (
    _LEAVE_STARTED
    + """
redis.call('HSET', KEYS[4], 'status', 'scheduled')
redis.call('ZADD', KEYS[8], ARGV[6], ARGV[5])
redis.call('ZADD', KEYS[9], ARGV[6], ARGV[5])
redis.call('DEL', KEYS[1])
return 1
"""
)

#: Put due deferred jobs back at the end of their queue (as RQ's scheduler would), unless an RQ
#: scheduler (``--with-scheduler``) holds the queue's lock: then it does, and a job it already
#: moved is only dropped from the deferred set. RQ's scheduler reads the due ids and moves them
#: in a later MULTI, so moving them here too while it runs could queue a job twice.
#: KEYS: deferred set, ScheduledJobRegistry, queue list, RQ scheduler lock.
#: ARGV: now (epoch seconds), job key prefix, enqueued_at (RQ's format), batch. Returns moved.
_PROMOTE = """
local rq_scheduler = redis.call('EXISTS', KEYS[4]) == 1
local moved = 0
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
for _, job_id in ipairs(due) do
  if redis.call('ZSCORE', KEYS[2], job_id) == false then
    redis.call('ZREM', KEYS[1], job_id)
  elseif not rq_scheduler then
    redis.call('ZREM', KEYS[1], job_id)
    redis.call('ZREM', KEYS[2], job_id)
    if redis.call('EXISTS', ARGV[2] .. job_id) == 1 then
      redis.call('HSET', ARGV[2] .. job_id, 'status', 'queued', 'enqueued_at', ARGV[3])
      redis.call('RPUSH', KEYS[3], job_id)
      moved = moved + 1
    end
  end
end
return moved
"""

#: The started members of one queue whose lease is gone (abandoned by a dead process).
#: KEYS: started set. ARGV: lease prefix. Returns the members.
_ABANDONED = """
local found = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local sep = string.find(member, ':[^:]*$')
  local job_id = string.sub(member, 1, sep - 1)
  local token = string.sub(member, sep + 1)
  local lease = redis.call('GET', ARGV[1] .. job_id)
  if not lease or string.sub(lease, -(#token + 1)) ~= ':' .. token then
    table.insert(found, member)
  end
end
return found
"""


class Leases:
    """The fenced lease operations, on one Redis connection (one per process: see ``fork``)."""

    def __init__(self, connection: Redis[Any], lease_ttl: float) -> None:
        self.connection = connection
        self.lease_ms = max(1, int(lease_ttl * 1000))
        self._renew = connection.register_script(_RENEW)
        self._write_meta = connection.register_script(_WRITE_META)
        self._transition = connection.register_script(_TRANSITION)
        self._transition_sha = hashlib.sha1(_TRANSITION.encode(), usedforsecurity=False).hexdigest()
        self._requeue = connection.register_script(_REQUEUE)
        self._abandoned = connection.register_script(_ABANDONED)
        self._defer = connection.register_script(_DEFER)
        self._promote = connection.register_script(_PROMOTE)

    def start(self, pipeline: Pipeline[Any], attempt: AttemptKeys) -> None:
        """Take the lease and join the started set, in the caller's MULTI with RQ's own start."""
        pipeline.set(lease_key(attempt.job_id), f"run:{attempt.token}", px=self.lease_ms)
        pipeline.zadd(started_key(attempt.queue), {attempt.member: time.time()})

    @staticmethod
    def forget(pipeline: Pipeline[Any], attempt: AttemptKeys) -> None:
        """Drop the lease and the started member, in the caller's MULTI with RQ's own settle."""
        pipeline.delete(lease_key(attempt.job_id))
        pipeline.zrem(started_key(attempt.queue), attempt.member)

    def renew(self, attempt: AttemptKeys) -> bool:
        """Extend the lease by its TTL; False when another attempt (or nobody) holds it."""
        return bool(
            self._renew(keys=[lease_key(attempt.job_id)], args=[attempt.token, self.lease_ms])
        )

    def write_meta(self, attempt: AttemptKeys, meta: bytes) -> bool:
        """Store the job's serialized meta while the attempt runs; False when fenced out."""
        keys = [lease_key(attempt.job_id), f"rq:job:{attempt.job_id}"]
        return bool(self._write_meta(keys=keys, args=[attempt.token, meta]))

    def transition(
        self, attempt: AttemptKeys, accepted: Sequence[str], state: str, ttl_ms: int | None = None
    ) -> bool:
        """Move the lease from one of ``accepted`` states to ``state``; False when not ours."""
        keys = [lease_key(attempt.job_id), started_key(attempt.queue)]
        args: list[Any] = [
            attempt.token,
            _accepted(accepted),
            state,
            ttl_ms if ttl_ms is not None else self.lease_ms,
            attempt.member,
        ]
        return bool(self._transition(keys=keys, args=args))

    def transition_in(
        self,
        pipeline: Pipeline[Any],
        attempt: AttemptKeys,
        accepted: Sequence[str],
        state: str,
        ttl_ms: int,
    ) -> None:
        """:meth:`transition`, queued on the caller's pipeline (its reply is 1 when it moved).

        A bare EVALSHA: a registered script called on a pipeline makes redis-py send SCRIPT
        EXISTS first, in a round trip of its own, on every execute (one per job, on the hot
        path). When the server does not know the script (the first job, a restarted or flushed
        Redis) the reply is a :class:`redis.exceptions.NoScriptError`, nothing ran, and the caller
        falls back to :meth:`transition`, which loads it.
        """
        keys = [lease_key(attempt.job_id), started_key(attempt.queue)]
        args: list[Any] = [attempt.token, _accepted(accepted), state, ttl_ms, attempt.member]
        pipeline.evalsha(self._transition_sha, len(keys), *keys, *args)

    def requeue(self, attempt: AttemptKeys, accepted: Sequence[str], meta: bytes | None) -> bool:
        """Back to the front of the queue (see ``_REQUEUE``); True when this call requeued it."""
        args: list[Any] = [
            attempt.token,
            _accepted(accepted),
            attempt.member,
            meta if meta is not None else b"",
            attempt.job_id,
        ]
        return bool(self._requeue(keys=attempt.keys(), args=args))

    def defer(
        self, attempt: AttemptKeys, accepted: Sequence[str], meta: bytes, run_at: float
    ) -> bool:
        """Into the ScheduledJobRegistry until ``run_at`` (see ``_DEFER``); True when done."""
        args: list[Any] = [
            attempt.token,
            _accepted(accepted),
            attempt.member,
            meta,
            attempt.job_id,
            repr(run_at),
        ]
        return bool(self._defer(keys=attempt.defer_keys(), args=args))

    def promote(self, queue: str, enqueued_at: str, now: float | None = None) -> int:
        """Put ``queue``'s due deferred jobs back in it (see ``_PROMOTE``); return how many."""
        keys = [
            deferred_key(queue),
            f"rq:scheduled:{queue}",
            f"rq:queue:{queue}",
            RQ_SCHEDULER_LOCK_PREFIX + queue,
        ]
        when = time.time() if now is None else now
        args: list[Any] = [repr(when), "rq:job:", enqueued_at, PROMOTE_BATCH]
        return int(self._promote(keys=keys, args=args))

    def abandoned(self, queue: str) -> list[AttemptKeys]:
        """Attempts of ``queue`` that workerkit started and whose lease is gone."""
        members = self._abandoned(keys=[started_key(queue)], args=[LEASE_PREFIX])
        found = []
        for raw in members:
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            job_id, _, token = member.rpartition(":")
            found.append(AttemptKeys(job_id, token, queue))
        return found

    def try_scan_lock(self, queue: str, owner: str, ttl: float) -> bool:
        """One scanner per queue per interval: the others skip (the scripts are safe anyway)."""
        key = SCAN_LOCK_PREFIX + queue
        return bool(self.connection.set(key, owner, nx=True, px=max(1, int(ttl * 1000))))


def _accepted(states: Sequence[str]) -> str:
    return "|" + "|".join(states) + "|"
