"""The scheduler's store on Redis, for the RQ and Celery engines: :class:`RedisSchedulerStore`.

The lease is a hash with a TTL on Redis's clock, its epoch from a counter that never expires. A
fire is ONE Lua script (``sched_fire.lua``): the checks, the unique record, the trigger request
and the engine's enqueue writes (:class:`RedisWrite`), so nothing publishes twice. Why and how:
docs/engines/rq.md and docs/engines/celery.md ("Periodic jobs").
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, Literal

import redis
from redis import exceptions as redis_errors

from workerkit.errors import StoreError, StoreUnavailable
from workerkit.scheduler.contract import (
    FireOutcome,
    FireRecord,
    LeaderInfo,
    Lease,
    Schedule,
    ScheduleState,
    fire_job_id,
    fire_key,
)

if TYPE_CHECKING:
    from redis.commands.core import Script

__all__ = (
    "DEFAULT_RETENTION",
    "EnqueueWrites",
    "RedisSchedulerStore",
    "RedisWrite",
    "WriteCommand",
    "scheduler_client",
    "scheduler_prefix",
    "store_error",
)

log = logging.getLogger("workerkit.scheduler")

#: Seconds a fire record is kept (``scheduler_retention``'s default).
DEFAULT_RETENTION: Final = 604800.0
#: Records one prune removes per schedule at most (the script stays short; the leader prunes
#: again within a minute).
_PRUNE_BATCH: Final = 10000

WriteCommand = Literal["HSET", "RPUSH", "LPUSH", "SADD"]


@dataclass(frozen=True)
class RedisWrite:
    """One write of an engine's enqueue, done inside the fire script.

    ``HSET`` takes field, value pairs flat in ``values``; ``RPUSH``/``LPUSH``/``SADD`` their
    elements. The script refuses (before writing anything) a key of another Redis type.
    """

    command: WriteCommand
    key: str
    values: tuple[str | bytes | int | float, ...]

    def __post_init__(self) -> None:
        if self.command not in ("HSET", "RPUSH", "LPUSH", "SADD"):
            raise ValueError(f"RedisWrite: {self.command!r} is not HSET, RPUSH, LPUSH or SADD")
        if not self.values or (self.command == "HSET" and len(self.values) % 2):
            raise ValueError(f"RedisWrite {self.command} {self.key}: values missing or unpaired")


#: What an engine gives the store: the writes that enqueue one fire's job, given the schedule,
#: the fire time and the job id (:func:`~workerkit.scheduler.contract.fire_job_id`).
EnqueueWrites = Callable[[Schedule, float, str], Sequence[RedisWrite]]


def scheduler_client(url: str) -> redis.Redis[Any]:
    """A client for the scheduler: short timeouts and one immediate retry, no backoff.

    The runner retries each retry period; redis-py's default backoff would hold a renew or a
    fire for seconds while Redis is down. Every script is safe to run twice (a fire's record
    answers the second run ``already_fired``).
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=2,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
    )


#: Redis's answers for a server that cannot serve writes for now (memory full, a replica after
#: a failover, a long script, a failed RDB save, loading its data, a cluster resharding): ridden
#: out like an outage, never fatal (they are shared by every replica at once).
TRANSIENT_CODES: Final = (
    "OOM",
    "READONLY",
    "BUSY",
    "MISCONF",
    "LOADING",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "NOREPLICAS",
)
_TRANSIENT_CLASSES: Final = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.MasterDownError,
)


def store_error(exc: redis_errors.RedisError) -> StoreError:
    """``exc`` as workerkit's error: :class:`StoreUnavailable` (with Redis's reason) when Redis
    cannot serve for now (unreachable, or one of :data:`TRANSIENT_CODES`), else StoreError."""
    # redis-py strips the code it maps to a class (OutOfMemoryError) from the message.
    # A pipeline's error reads "Command # 1 (...) of pipeline caused error: BUSY ...".
    found = re.match(r"(?:Command # \d+ .*? caused error: )?([A-Z]+)\b", str(exc))
    code = getattr(exc, "status_code", None) or (found.group(1) if found else "")
    if type(exc).__name__ == "OutOfMemoryError":
        code = "OOM"
    reason = f"{type(exc).__name__}: {exc}"
    if code in TRANSIENT_CODES and code not in reason:
        reason = f"{type(exc).__name__}: {code} {exc}"
    if isinstance(exc, _TRANSIENT_CLASSES) or code in TRANSIENT_CODES:
        return StoreUnavailable(f"redis unavailable: {reason}")
    return StoreError(f"scheduler store: redis: {reason}")


def scheduler_prefix(base: str, namespace: str = "default") -> str:
    """The key prefix of one scheduler namespace (``scheduler_namespace``): ``base`` itself for
    ``default`` (the key names of before namespaces), ``base`` with ``@<namespace>`` otherwise
    (``workerkit:scheduler:rq@billing:``), which no name in another namespace can produce."""
    if namespace == "default":
        return base
    return f"{base.removesuffix(':')}@{namespace}:"


def _script(name: str) -> str:
    return resources.files("workerkit.scheduler").joinpath(name).read_text(encoding="utf-8")


_ACQUIRE: Final = _script("sched_acquire.lua")
_RENEW: Final = _script("sched_renew.lua")
_RELEASE: Final = _script("sched_release.lua")
_LEADER: Final = _script("sched_leader.lua")
_REGISTER: Final = _script("sched_register.lua")
_FIRE: Final = _script("sched_fire.lua")
_PRUNE: Final = _script("sched_prune.lua")
_REQUEST: Final = _script("sched_request.lua")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisSchedulerStore:
    """:class:`~workerkit.scheduler.contract.SchedulerStore` on Redis (Redis 5 or later).

    ``enqueue`` builds the engine's writes of one fire (the RQ job hash and queue list, the
    Celery message). ``prefix`` keeps one scheduler's keys apart from another's (each engine
    has its own). Thread-safe: redis-py's pool gives each call a connection.
    """

    def __init__(
        self,
        client: redis.Redis[Any],
        enqueue: EnqueueWrites,
        *,
        prefix: str,
        retention: float = DEFAULT_RETENTION,
        namespace: str = "default",
    ) -> None:
        if retention <= 0:
            raise ValueError(f"retention must be above 0 seconds, got {retention}")
        self.client = client
        self.enqueue = enqueue
        self.prefix = prefix
        self.namespace = namespace  # only for job ids: ``prefix`` already holds it
        self.retention = retention
        self._owns_client = False
        # The holder of the epoch this store last acquired: a leader's fire is fenced on both.
        self._holders: dict[int, str] = {}
        self._scripts: dict[str, Script] = {
            name: client.register_script(text)
            for name, text in (
                ("acquire", _ACQUIRE),
                ("renew", _RENEW),
                ("release", _RELEASE),
                ("leader", _LEADER),
                ("register", _REGISTER),
                ("fire", _FIRE),
                ("prune", _PRUNE),
                ("request", _REQUEST),
            )
        }

    @classmethod
    def from_url(
        cls, url: str, enqueue: EnqueueWrites, *, prefix: str, retention: float = DEFAULT_RETENTION
    ) -> RedisSchedulerStore:
        """A store with its own client on ``url``; the client is closed by :meth:`close`."""
        store = cls(scheduler_client(url), enqueue, prefix=prefix, retention=retention)
        store.own_client()
        return store

    def own_client(self) -> None:
        """:meth:`close` closes the client too (the store was given a client made for it)."""
        self._owns_client = True

    def __repr__(self) -> str:
        return f"<RedisSchedulerStore prefix={self.prefix!r}>"

    # --- keys -----------------------------------------------------------------------------

    def key(self, kind: str, name: str = "", fire_ms: int | None = None) -> str:
        """The key of ``kind`` (``lease``, ``epoch``, ``names``, ``state``, ``fire``, ...)."""
        key = self.prefix + kind
        if name:
            key += ":" + name
        if fire_ms is not None:
            key += f":{fire_ms}"
        return key

    def _run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return self._scripts[script](keys=list(keys), args=list(args))
        except redis_errors.RedisError as exc:
            raise store_error(exc) from exc

    # --- leadership -----------------------------------------------------------------------

    def acquire(self, holder: str, duration: float) -> Lease | None:
        reply = self._run(
            "acquire", [self.key("lease"), self.key("epoch")], [holder, _ms(duration)]
        )
        if int(reply[0]) != 1:
            return None
        lease = Lease(holder=_text(reply[1]), epoch=int(reply[2]), expires_at=int(reply[3]) / 1000)
        self._holders = {lease.epoch: lease.holder}  # one replica leads under one epoch
        return lease

    def renew(self, lease: Lease, duration: float) -> Lease | None:
        reply = self._run("renew", [self.key("lease")], [lease.holder, lease.epoch, _ms(duration)])
        if reply is None:
            return None
        return Lease(holder=lease.holder, epoch=lease.epoch, expires_at=int(reply) / 1000)

    def release(self, lease: Lease) -> None:
        self._run("release", [self.key("lease")], [lease.holder, lease.epoch])
        self._holders.pop(lease.epoch, None)

    def leader(self) -> LeaderInfo | None:
        reply = self._run("leader", [self.key("lease")], [])
        if reply is None:
            return None
        return LeaderInfo(
            holder=_text(reply[0]), epoch=int(reply[1]), expires_in=int(reply[2]) / 1000
        )

    def register(self, lease: Lease, schedules: Sequence[Schedule]) -> bool:
        args: list[Any] = [lease.holder, lease.epoch, self.prefix]
        for schedule in schedules:
            args += [schedule.name, schedule.fingerprint()]
        return bool(self._run("register", [self.key("lease"), self.key("names")], args))

    # --- fires ----------------------------------------------------------------------------

    def fire(
        self, schedule: Schedule, fire_time: float, *, epoch: int | None, reason: str
    ) -> FireOutcome:
        name = schedule.name
        ms = fire_key(fire_time)
        job_id = fire_job_id(name, fire_time, self.namespace)
        writes = list(self.enqueue(schedule, fire_time, job_id))
        keys = [
            self.key("lease"),
            self.key("state", name),
            self.key("fire", name, ms),
            self.key("last", name),
            self.key("index", name),
            self.key("trigger", name),
        ]
        # A leader's fire is fenced on holder AND epoch (an epoch number handed out again after
        # a failover to a lagging replica belongs to another holder); an epoch this store
        # never acquired has no holder here and is refused.
        holder = "" if epoch is None else self._holders.get(epoch, "")
        args: list[Any] = [
            "" if epoch is None else epoch,
            holder,
            schedule.fingerprint(),
            ms,
            job_id,
            reason,
            _ms(self.retention),
            len(writes),
        ]
        for write in writes:
            keys.append(write.key)
            args += [write.command, len(write.values), *write.values]
        return FireOutcome(_text(self._run("fire", keys, args)))

    def states(self, names: Sequence[str] | None = None) -> dict[str, ScheduleState]:
        try:
            if names is None:
                names = sorted(_text(n) for n in self.client.smembers(self.key("names")))
            with self.client.pipeline(transaction=False) as pipe:
                pipe.smembers(self.key("names"))
                for name in names:
                    pipe.hmget(self.key("state", name), "fingerprint", "paused", "removed")
                    pipe.hmget(
                        self.key("last", name),
                        *("fire_ms", "recorded_ms", "job_id", "reason", "fingerprint"),
                    )
                    pipe.zrange(self.key("trigger", name), 0, -1)
                replies = pipe.execute()
        except redis_errors.RedisError as exc:
            raise store_error(exc) from exc
        known = {_text(n) for n in replies[0]}
        states: dict[str, ScheduleState] = {}
        for i, name in enumerate(names):
            state, last, triggers = replies[1 + 3 * i : 4 + 3 * i]
            if name not in known:
                continue
            record = None
            if last[0] is not None:
                record = FireRecord(
                    schedule=name,
                    fire_time=int(last[0]) / 1000,
                    recorded_at=int(last[1]) / 1000,
                    job_id=_text(last[2]),
                    reason=_text(last[3]),
                    fingerprint=None if last[4] is None else _text(last[4]),
                )
            states[name] = ScheduleState(
                name=name,
                fingerprint=None if state[0] is None else _text(state[0]),
                paused=state[1] is not None and _text(state[1]) == "1",
                last_fire=record,
                triggers=tuple(int(_text(t)) / 1000 for t in triggers),
                removed=state[2] is not None and _text(state[2]) == "1",
            )
        return states

    def fire_record(self, name: str, fire_time: float) -> FireRecord | None:
        """The record of one fire, while it is kept (for tests and operators)."""
        try:
            raw = self.client.get(self.key("fire", name, fire_key(fire_time)))
        except redis_errors.RedisError as exc:
            raise store_error(exc) from exc
        if raw is None:
            return None
        # [recorded ms, job id, reason, fingerprint]; records of before fingerprints have 3.
        recorded, job_id, reason, *rest = json.loads(raw)
        return FireRecord(
            name,
            fire_key(fire_time) / 1000,
            int(recorded) / 1000,
            job_id,
            reason,
            fingerprint=rest[0] if rest else None,
        )

    def set_paused(self, name: str, paused: bool) -> bool:
        keys = [self.key("names"), self.key("state", name)]
        return bool(self._run("request", keys, [name, "paused", "1" if paused else "0"]))

    def request_trigger(self, name: str, at: float) -> bool:
        keys = [self.key("names"), self.key("trigger", name)]
        return bool(self._run("request", keys, [name, "trigger", fire_key(at)]))

    def prune(self, lease: Lease, older_than: float) -> int:
        keys = [self.key("lease"), self.key("names")]
        args = [lease.holder, lease.epoch, self.prefix, fire_key(older_than), _PRUNE_BATCH]
        return max(0, int(self._run("prune", keys, args)))

    def clock(self) -> float:
        try:
            seconds, micros = self.client.time()
        except redis_errors.RedisError as exc:
            raise store_error(exc) from exc
        return int(seconds) + int(micros) / 1_000_000

    def close(self) -> None:
        close_enqueue = getattr(self.enqueue, "close", None)
        if callable(close_enqueue):
            close_enqueue()
        if self._owns_client:
            self.client.close()
