"""Job leases on Redis: the keys, the Lua scripts, and the fenced operations built on them.

Every attempt a workerkit RQ worker starts holds the lease ``workerkit:rq:lease:<job id>`` =
``<state>:<token>`` (``run``, ``settle``, ``release`` or ``recover``; the token is RQ's
execution id). Each change of hands checks the lease and moves the job in one Lua script (the
``.lua`` files next to this module), so that of two workers racing for an abandoned job exactly
one requeues it, and a job whose attempt still renews its lease is never requeued. See
docs/engines/rq.md.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

__all__ = (
    "LEASE_PREFIX",
    "SETTLE_TTL_MS",
    "STARTED_PREFIX",
    "WAKE_PREFIX",
    "AttemptKeys",
    "Leases",
    "Start",
    "deferred_key",
    "lease_key",
    "settled_key",
    "started_key",
)

LEASE_PREFIX: Final = "workerkit:rq:lease:"
STARTED_PREFIX: Final = "workerkit:rq:started:"
SCAN_LOCK_PREFIX: Final = "workerkit:rq:scan:"
WAKE_PREFIX: Final = "workerkit:rq:wake:"
DEFERRED_PREFIX: Final = "workerkit:rq:deferred:"
#: The token of the attempt whose settle landed last, per job (a retried settle reads it).
SETTLED_PREFIX: Final = "workerkit:rq:settled:"
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


def settled_key(job_id: str) -> str:
    return SETTLED_PREFIX + job_id


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
        """KEYS of ``requeue.lua`` (and the first of ``defer.lua``), in their order."""
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
        """KEYS of ``defer.lua``: :meth:`keys`, the ScheduledJobRegistry, the deferred set."""
        return [*self.keys(), f"rq:scheduled:{self.queue}", deferred_key(self.queue)]

    def ref(self) -> dict[str, Any]:
        """The delivery ref the supervisor keeps (and passes back to ``release_in_flight``)."""
        return {"job_id": self.job_id, "token": self.token, "queue": self.queue}


def _script(*parts: str) -> str:
    """A script from the ``.lua`` files next to this module, concatenated in order."""
    folder = resources.files(__package__ or "workerkit.engines.rq")
    return "".join(folder.joinpath(f"{part}.lua").read_text(encoding="utf-8") for part in parts)


_RENEW: Final = _script("renew")
_WRITE_STATE: Final = _script("write_state")
_TRANSITION: Final = _script("owned", "transition")
_REQUEUE: Final = _script("owned", "leave_started", "requeue")
_DEFER: Final = _script("owned", "leave_started", "defer")
_PROMOTE: Final = _script("promote")
_ABANDONED: Final = _script("abandoned")
_PUSH_BACK: Final = _script("push_back")
_START: Final = _script("start")


@dataclass(frozen=True)
class Start:
    """What :meth:`Leases.start` did: started (``ok``), or why not."""

    ok: bool
    why: str


class Leases:
    """The fenced lease operations, on one Redis connection (one per process: see ``fork``)."""

    def __init__(self, connection: Redis[Any], lease_ttl: float) -> None:
        self.connection = connection
        self.lease_ms = max(1, int(lease_ttl * 1000))
        self._renew = connection.register_script(_RENEW)
        self._write_state = connection.register_script(_WRITE_STATE)
        self._transition = connection.register_script(_TRANSITION)
        self._transition_sha = hashlib.sha1(_TRANSITION.encode(), usedforsecurity=False).hexdigest()
        self._requeue = connection.register_script(_REQUEUE)
        self._abandoned = connection.register_script(_ABANDONED)
        self._defer = connection.register_script(_DEFER)
        self._promote = connection.register_script(_PROMOTE)
        self._push_back = connection.register_script(_PUSH_BACK)
        self._start = connection.register_script(_START)

    def start(self, attempt: AttemptKeys, writes: Sequence[Sequence[Any]]) -> Start:
        """Take the lease, join the started set and make RQ's start ``writes`` (commands, as a
        pipeline records them) in one script, only while no other attempt holds the job and it
        is queued (see ``start.lua``)."""
        args: list[Any] = [attempt.token, self.lease_ms, attempt.member, time.time()]
        for command in writes:
            args.append(len(command))
            args.extend(command)
        keys = [lease_key(attempt.job_id), f"rq:job:{attempt.job_id}", started_key(attempt.queue)]
        reply = self._start(keys=keys, args=args)
        code = int(reply[0])
        if code == 1:
            return Start(True, "")
        found = _text(reply[1]) if len(reply) > 1 else ""
        if code == 0:
            return Start(False, f"another attempt holds it (lease {found!r})")
        return Start(False, f"it is not queued any more (status {found!r}): queued twice")

    @staticmethod
    def forget(pipeline: Pipeline[Any], attempt: AttemptKeys) -> None:
        """Drop the lease and the started member, in the caller's MULTI with RQ's own settle,
        and mark the job settled by this attempt (:meth:`settled_by`) for :data:`SETTLE_TTL_MS`.
        """
        pipeline.delete(lease_key(attempt.job_id))
        pipeline.zrem(started_key(attempt.queue), attempt.member)
        pipeline.set(settled_key(attempt.job_id), attempt.token, px=SETTLE_TTL_MS)

    def settled_by(self, attempt: AttemptKeys) -> bool:
        """Whether this attempt's own settle landed (its reply may have been lost): the mark
        its settle left names its token."""
        mark = self.connection.get(settled_key(attempt.job_id))
        return mark is not None and _text(mark) == attempt.token

    def renew(self, attempt: AttemptKeys) -> bool:
        """Extend the lease by its TTL; False when another attempt (or nobody) holds it."""
        return bool(
            self._renew(keys=[lease_key(attempt.job_id)], args=[attempt.token, self.lease_ms])
        )

    def write_state(self, attempt: AttemptKeys, state: bytes) -> bool:
        """Store workerkit's state of the job (a checkpoint) while the attempt runs.

        False when fenced out. The state is the job hash's ``workerkit`` field
        (:data:`~workerkit.engines.rq.jobs.META_KEY`), never the user's meta.
        """
        keys = [lease_key(attempt.job_id), f"rq:job:{attempt.job_id}"]
        return bool(self._write_state(keys=keys, args=[attempt.token, state]))

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

    def requeue(self, attempt: AttemptKeys, accepted: Sequence[str], state: bytes | None) -> bool:
        """Back to the front of the queue (see ``requeue.lua``); True when this call requeued it.

        ``state``: workerkit's new state of the job (None keeps it).
        """
        args: list[Any] = [
            attempt.token,
            _accepted(accepted),
            attempt.member,
            state if state is not None else b"",
            attempt.job_id,
        ]
        return bool(self._requeue(keys=attempt.keys(), args=args))

    def defer(
        self, attempt: AttemptKeys, accepted: Sequence[str], state: bytes, run_at: float
    ) -> bool:
        """Into the ScheduledJobRegistry until ``run_at`` (see ``defer.lua``); True when done."""
        args: list[Any] = [
            attempt.token,
            _accepted(accepted),
            attempt.member,
            state,
            attempt.job_id,
            repr(run_at),
        ]
        return bool(self._defer(keys=attempt.defer_keys(), args=args))

    def promote(self, queue: str, enqueued_at: str, now: float | None = None) -> int:
        """Put ``queue``'s due deferred jobs back in it (see ``promote.lua``); return how many."""
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

    def push_back(self, queue: str, job_id: str) -> bool:
        """A job id popped as Redis went away, back to the front if nobody has it (see
        ``push_back.lua``); True when pushed back."""
        keys = [f"rq:queue:{queue}", f"rq:job:{job_id}", lease_key(job_id)]
        return bool(self._push_back(keys=keys, args=[job_id]))

    def try_scan_lock(self, queue: str, owner: str, ttl: float) -> bool:
        """One scanner per queue per interval: the others skip (the scripts are safe anyway)."""
        key = SCAN_LOCK_PREFIX + queue
        return bool(self.connection.set(key, owner, nx=True, px=max(1, int(ttl * 1000))))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _accepted(states: Sequence[str]) -> str:
    return "|" + "|".join(states) + "|"
