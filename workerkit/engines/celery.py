"""The celery engine: a Celery worker on Redis, with a bounded, lossless shutdown.

``workerkit run celery --app MODULE:APP [-- celery worker options]`` starts this module
(``python -m workerkit.engines.celery``) as the supervisor's child. It runs the user's Celery app
with ``celery worker`` semantics plus, inside the worker:

* **safe defaults** (:func:`configure_app`): late acks, reject on worker lost, prefetch
  multiplier 1, a hard time limit of J with a soft limit below it, the Redis transport's
  visibility timeout V; user overrides are reported by the timing budget (rules C1-C6, V1-V3);
* **its own SIGTERM handler** in the main process: stop dispatching at once and hand messages
  not yet given to the pool back to their queue; the tasks in hand may finish; exit as soon as
  nothing is in hand (an idle worker exits in tens of milliseconds; Celery's own warm shutdown
  joins the pool and takes seconds, and waits for running tasks without bound). SIGINT is
  ignored (a terminal's Ctrl-C reaches the whole group; the supervisor decides). Pool children
  ignore SIGTERM and SIGINT: a signal meant for the pod must never kill a task mid-run;
* the supervisor's commands: ``request_stop`` reaches every process that runs tasks (pool
  children have their own channel connection) and sets ``stop_requested`` on their jobs;
  ``release`` kills the pool children, puts every message in hand back at the head of its queue
  (attempt not consumed) and exits 0;
* **crash recovery** within a window W (the ``recovery_window`` setting, default 30 s)
  instead of the visibility timeout: see :class:`Ledger`;
* **the job context** in every task run (:func:`workerkit.current_job`), with checkpoints kept in
  Redis by task id and fenced by an attempt token, so they survive a release or a crash.

Crash recovery, and why a running task is never handed out twice
------------------------------------------------------------------
kombu's Redis transport keeps every delivered, unacknowledged message in the hash ``unacked``
(tag -> [payload, exchange, routing key]) and its delivery time in the sorted set
``unacked_index``; it restores them only after the visibility timeout V, which must stay longer
than any run (nothing can extend it). workerkit adds a *lease key* per message,
``workerkit:celery:lease:<tag>`` = the owning worker's id, with a TTL of W/2, refreshed every W/6
by a thread of the owning worker's main process for every message it holds. Every live worker
scans ``unacked_index`` every W/4 for messages delivered more than W/2 ago (a fresh delivery has
had time to get its lease) whose lease key is gone, and restores them. Each restore is one
Redis transaction that WATCHes the ``unacked`` hash and the lease key (kombu's own
``restore_by_tag`` uses the same WATCH on ``unacked``): if the owner acknowledged the message,
renewed its lease, or another worker restored it first, the transaction fails and is re-read,
so two workers cannot both restore a message, and a message whose owner is alive is never
restored. A dead owner's message is back in its queue at most W/2 + W/4 + a scan after its last
renewal. The lease is per message, so a worker never renews a message it no longer holds.

Attempts and fencing, without a Redis round trip per task: every workerkit restore rewrites
the message in the same transaction (GEN_HEADER +1; CRASHES_HEADER +1 when the run's worker
died: crash recovery, the supervisor's release after a crash, a lost prefork child, whose
Celery requeue goes through :class:`_WorkerkitRequestMixin`). A run reads its attempt (1 +
retries + crashes) and its checkpoint generation from ``task.request``; the checkpoint is read
and its fence taken only when the task touches it (:class:`_CeleryJobContext`). A release gives
nothing to count back: only crashes count. After ``workerkit_max_attempts`` crashes (default 3)
the next delivery fails the task without running it (a poison message).
Restores never drop a message whose exchange binding is missing in Redis (:meth:`Ledger._route`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from workerkit import events as events_module
from workerkit.engines.base import AppTiming
from workerkit.errors import ConfigurationError, IdempotencyInProgress, LeaseLost, ReleaseJob
from workerkit.job import JobContext, request_stop_all

if TYPE_CHECKING:
    from workerkit.settings import Settings
    from workerkit.timing import CeleryFacts, TaskTiming

__all__ = (
    "KEY_PREFIX",
    "CeleryEngine",
    "Ledger",
    "configure_app",
    "load_celery_app",
    "main",
)

# Not __name__: run as ``python -m workerkit.engines.celery`` this module is "__main__".
log = logging.getLogger("workerkit.engines.celery")

#: Every key workerkit keeps in the broker's Redis starts with this.
KEY_PREFIX: Final = "workerkit:celery:"
#: Keys of finished work (attempts, checkpoints) expire after this, whatever happens.
_KEY_RETENTION: Final = 7 * 24 * 3600
_HEARTBEAT_EVERY: Final = 2.0
#: (Celery's retries, workerkit's restores, start time in ms): see _FENCE_LUA.
Generation = tuple[int, int, int]
_HEALTH_EVERY: Final = 5.0
_DRAIN_TICK: Final = 0.02

#: Message headers workerkit adds when it puts a message back in its queue (every restore is
#: a read-modify-write of the payload in kombu's ``unacked`` hash, inside the restore's
#: transaction). Celery copies every message header into ``task.request``, so a run learns its
#: attempt and its fencing generation without a Redis round trip of its own.
GEN_HEADER: Final = "workerkit_gen"  # +1 at every workerkit restore
CRASHES_HEADER: Final = "workerkit_crashes"  # +1 when the run's worker died
#: Runs whose worker died after which a message is failed instead of run again (a poison
#: message that kills its worker every time). Per task: ``@app.task(workerkit_max_attempts=5)``.
DEFAULT_MAX_ATTEMPTS: Final = 3

# Checkpoints are fenced by the attempt's *generation* "retries:gen:started_ms" (Celery's retry
# count, workerkit's restore count, the run's start time in ms), compared as numbers, in that
# order. The fence key holds the highest generation that touched the checkpoint; an attempt
# whose generation is lower is stale. Ordering (rather than "the last attempt to start wins",
# which needs a write at every start) lets the fence be taken lazily, at the first read or
# write of the checkpoint: a stale attempt that touches it first cannot take it from a newer
# one later, and one that touches it after a newer one is refused. Retries and restores order
# attempts exactly; the start time only orders two runs of one delivery (a restore that is not
# workerkit's, e.g. kombu's own after the visibility timeout).
_FENCE_LUA = """
local function stale(fence)
  if not fence then return false end
  local a, b, c = string.match(fence, '^(%d+):(%d+):(%d+)$')
  if not a then return false end
  local mine = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])}
  local theirs = {tonumber(a), tonumber(b), tonumber(c)}
  for i = 1, 3 do
    if theirs[i] ~= mine[i] then return theirs[i] > mine[i] end
  end
  return false
end
local function take()
  redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3], 'EX', ARGV[4])
end
"""
# Read the checkpoint and take the fence, atomically: {1, checkpoint} or {0, checkpoint}
# (stale). ARGV: retries, gen, started_ms, ttl.
_CLAIM_CHECKPOINT = (
    _FENCE_LUA
    + """
local stored = redis.call('GET', KEYS[2])
if stale(redis.call('GET', KEYS[1])) then return {0, stored} end
take()
return {1, stored}
"""
)
# The fenced checkpoint write: 0 (and nothing written) when a newer attempt touched it.
# ARGV: retries, gen, started_ms, ttl, state.
_SAVE_CHECKPOINT = (
    _FENCE_LUA
    + """
if stale(redis.call('GET', KEYS[1])) then return 0 end
take()
redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[4])
return 1
"""
)
# The task succeeded: its checkpoint and fence go, unless a newer attempt owns them.
_FINISH = (
    _FENCE_LUA
    + """
if stale(redis.call('GET', KEYS[1])) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""
)


def _int(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


# --- the app ----------------------------------------------------------------------------


def load_celery_app(spec: str | None) -> Any:
    """The ``celery.Celery`` app named by ``spec`` (``--app`` / ``WORKERKIT_APP``)."""
    from celery import Celery

    from workerkit.loading import import_app

    if not spec:
        raise ConfigurationError(
            "the celery engine needs an app: give --app MODULE:APP or WORKERKIT_APP"
        )
    app = import_app(spec)
    if not isinstance(app, Celery):
        raise ConfigurationError(
            f"--app {spec!r} is a {type(app).__name__}, not a celery.Celery app; the celery "
            "engine runs Celery apps (use --engine sql for a workerkit.App)"
        )
    return app


def _user_value(app: Any, key: str) -> Any:
    """The app's value for a Celery setting, or None when it is Celery's default."""
    from celery.app.defaults import DEFAULTS

    value = app.conf.get(key)
    return None if value == DEFAULTS.get(key) else value


def celery_facts(app: Any) -> CeleryFacts:
    """What the app overrides among the settings workerkit manages (for the timing budget)."""
    from workerkit.timing import CeleryFacts

    options = app.conf.get("broker_transport_options") or {}
    visibility = options.get("visibility_timeout")
    return CeleryFacts(
        acks_late=_user_value(app, "task_acks_late"),
        reject_on_worker_lost=_user_value(app, "task_reject_on_worker_lost"),
        prefetch_multiplier=_user_value(app, "worker_prefetch_multiplier"),
        soft_time_limit=_user_value(app, "task_soft_time_limit"),
        time_limit=_user_value(app, "task_time_limit"),
        visibility_timeout=float(visibility) if visibility is not None else None,
    )


def _user_tasks(app: Any) -> list[Any]:
    return [task for name, task in sorted(app.tasks.items()) if not name.startswith("celery.")]


def task_timings(app: Any) -> tuple[TaskTiming, ...]:
    """Each user task's hard limit and whether a re-run is safe."""
    from workerkit.idempotency import idempotency_of
    from workerkit.timing import TaskTiming

    timings = []
    for task in _user_tasks(app):
        run = getattr(task, "_workerkit_original_run", task.run)
        limit = task.time_limit
        timings.append(
            TaskTiming(
                name=task.name,
                timeout=float(limit) if limit else None,
                idempotent=idempotency_of(run) is not None
                or bool(getattr(task, "workerkit_idempotent", False)),
                checkpointed=bool(getattr(task, "workerkit_checkpointed", False)),
            )
        )
    return tuple(timings)


def configure_app(app: Any, settings: Settings) -> None:
    """Apply workerkit's safe defaults to the app, leaving what the user set explicitly.

    Overrides that break the timing budget were reported (and refused when errors) by the
    supervisor before the worker started.
    """
    conf = app.conf
    if not str(conf.broker_url or "").startswith(("redis://", "rediss://", "redis+socket://")):
        if _user_value(app, "broker_url") is not None:
            raise ConfigurationError(
                f"the celery engine needs a Redis broker; the app's broker_url is "
                f"{str(conf.broker_url).split(':', 1)[0]}://... (set it to a redis:// URL, or "
                f"remove it and set WORKERKIT_REDIS_URL)"
            )
        conf.broker_url = settings.redis_url
    defaults: dict[str, Any] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.job_timeout,
        "task_soft_time_limit": max(
            settings.job_timeout - settings.release_margin, settings.job_timeout / 2
        ),
        # workerkit's own JSON logging stays in charge of the root logger.
        "worker_hijack_root_logger": False,
        # A warm shutdown by Celery itself (never reached under workerkit) would otherwise wait.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
    }
    for key, value in defaults.items():
        if _user_value(app, key) is None:
            conf[key] = value
    options = dict(conf.get("broker_transport_options") or {})
    options.setdefault("visibility_timeout", settings.effective_visibility_timeout)
    conf.broker_transport_options = options


# --- the broker-side ledger -------------------------------------------------------------


class Ledger:
    """workerkit's keys in the broker's Redis: leases, attempts, checkpoints, restores.

    One per process (a forked child opens its own: a Redis connection must not be shared across
    a fork). It borrows a kombu channel of the app's broker so that key prefixes, queue bindings
    and priority queues are exactly kombu's.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.connection = app.connection_for_write()
        self.channel = self.connection.default_channel
        self.client = self.channel.client
        self.unacked_key: str = self.channel.unacked_key
        self.unacked_index_key: str = self.channel.unacked_index_key
        self._claim = self.client.register_script(_CLAIM_CHECKPOINT)
        self._save = self.client.register_script(_SAVE_CHECKPOINT)
        self._finish = self.client.register_script(_FINISH)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.release()

    @staticmethod
    def key(kind: str, name: str) -> str:
        return f"{KEY_PREFIX}{kind}:{name}"

    # --- one run: nothing at start; the checkpoint, fenced, when the task touches it ------

    def _keys(self, task_id: str) -> list[str]:
        return [self.key("fence", task_id), self.key("checkpoint", task_id)]

    def claim_checkpoint(self, task_id: str, generation: Generation) -> tuple[bool, Any]:
        """Take the fence and read the last checkpoint: (False, ...) when the attempt is stale."""
        fresh, raw = self._claim(keys=self._keys(task_id), args=[*generation, _KEY_RETENTION])
        return bool(fresh), (json.loads(raw) if raw is not None else None)

    def save_checkpoint(self, task_id: str, generation: Generation, state: Any) -> None:
        data = json.dumps(state, separators=(",", ":"))
        args = [*generation, _KEY_RETENTION, data]
        if not self._save(keys=self._keys(task_id), args=args):
            raise LeaseLost(f"task {task_id}: a newer attempt owns it; checkpoint not saved")

    def finish(self, task_id: str, generation: Generation) -> None:
        """The task completed: its checkpoint and fence go (unless a newer attempt has them)."""
        self._finish(keys=self._keys(task_id), args=[*generation, _KEY_RETENTION])

    # --- leases and restores --------------------------------------------------------------

    def refresh_leases(self, tags: Iterable[str], owner: str, ttl: float) -> None:
        pipe = self.client.pipeline(transaction=False)
        milliseconds = max(1, int(ttl * 1000))
        for tag in tags:
            pipe.set(self.key("lease", tag), owner, px=milliseconds)
        pipe.execute()

    def restore(
        self,
        tag: str,
        *,
        owners: Sequence[str] | None = None,
        crashed: bool = False,
        leftmost: bool = False,
    ) -> bool:
        """Put the unacknowledged message ``tag`` back in its queue, atomically.

        ``owners``: restore only when the lease key is gone or held by one of these (the worker
        that is releasing, or the dead worker the supervisor releases for); None: only when the
        lease is gone (crash recovery). False when the message was acknowledged, restored by
        someone else, is held by a live worker, or has no queue to go to (then it stays in
        ``unacked``, never dropped). ``crashed``: the run's worker died, the attempt counts.
        ``leftmost``: at the back of the queue (kombu's reject) instead of its head.
        """
        lease_key = self.key("lease", tag)
        restored = False

        def transaction(pipe: Any) -> None:
            nonlocal restored
            restored = False
            raw = pipe.hget(self.unacked_key, tag)
            holder = pipe.get(lease_key)
            if holder is not None:
                holder = holder.decode() if isinstance(holder, bytes) else str(holder)
            if raw is None or (holder is not None and holder not in (owners or ())):
                pipe.multi()
                return
            payload, exchange, routing_key = json.loads(raw)
            queues = self._route(exchange, routing_key)
            if not queues:
                pipe.multi()
                log.error(
                    "no queue to put a message back in; it stays unacknowledged",
                    extra={
                        "event": "restore_unroutable",
                        "tag": tag,
                        "exchange": exchange,
                        "routing_key": routing_key,
                    },
                )
                return
            headers = payload.get("headers")
            if not isinstance(headers, dict):
                headers = payload["headers"] = {}
            headers[GEN_HEADER] = _int(headers.get(GEN_HEADER)) + 1
            if crashed:
                headers[CRASHES_HEADER] = _int(headers.get(CRASHES_HEADER)) + 1
            # What kombu's own restore marks (Celery reads it as request.delivery_info).
            headers["redelivered"] = True
            with contextlib.suppress(KeyError, TypeError):
                payload["properties"]["delivery_info"]["redelivered"] = True
            data = json.dumps(payload)
            priority = self.channel._get_message_priority(payload, reverse=False)
            pipe.multi()
            pipe.zrem(self.unacked_index_key, tag)
            pipe.hdel(self.unacked_key, tag)
            pipe.delete(lease_key)
            # kombu publishes with LPUSH and consumes with BRPOP, so the head of a queue is its
            # right end (RPUSH; kombu's visibility-timeout restore does that too) and a reject
            # puts a message at the back (LPUSH).
            push = pipe.lpush if leftmost else pipe.rpush
            for queue in queues:
                push(self.channel._q_for_pri(queue, priority), data)
            restored = True

        # WATCH on the hash and the lease: an ack (HDEL), a renewal or another restore between
        # our read and EXEC aborts the transaction, and redis-py runs it again on fresh values.
        self.client.transaction(transaction, self.unacked_key, lease_key)
        return restored

    def _route(self, exchange: str, routing_key: str) -> list[str]:
        """The queues a restored message goes to: kombu's bindings, else the app's own queues.

        kombu routes a restore through the exchange's binding set ``_kombu.binding.<exchange>``
        and, when that key is missing (deleted, a FLUSHDB, a new Redis), pushes the message to
        no queue and drops it without a word. We fall back to the app's declared queues that
        match the exchange and routing key, then to a queue named by the routing key when the
        app knows one; with neither, nothing (the caller leaves the message unacknowledged).
        """
        if not exchange:  # the default exchange routes by queue name
            return [routing_key] if routing_key else []
        table = self.channel.get_table(exchange)
        if table:
            found = self.channel.typeof(exchange).lookup(table, exchange, routing_key, None)
            queues = [str(q) for q in found or () if q]
            if queues:
                return queues
        known: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            known = dict(self.app.amqp.queues)
        queues = [
            name
            for name, queue in known.items()
            if getattr(queue.exchange, "name", None) == exchange
            and queue.routing_key == routing_key
        ]
        if not queues and routing_key in known:
            queues = [routing_key]
        if queues:
            log.warning(
                "the exchange's binding is missing in Redis; restoring to the app's queue",
                extra={"event": "restore_binding_missing", "exchange": exchange, "queues": queues},
            )
        return queues

    def abandoned(self, older_than: float, limit: int = 100) -> list[str]:
        """Tags delivered before ``older_than`` (epoch seconds) whose lease key is gone."""
        tags = self.client.zrangebyscore(
            self.unacked_index_key, "-inf", older_than, start=0, num=limit
        )
        if not tags:
            return []
        names = [t.decode() if isinstance(t, bytes) else str(t) for t in tags]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.exists(self.key("lease", name))
        return [name for name, alive in zip(names, pipe.execute(), strict=True) if not alive]

    def task_id_of(self, tag: str) -> str | None:
        raw = self.client.hget(self.unacked_key, tag)
        if raw is None:
            return None
        with contextlib.suppress(Exception):
            payload = json.loads(raw)[0]
            return str(payload["headers"]["id"])
        return None

    def depths(self, queues: Sequence[str]) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        return {q: int(n) for q, n in zip(queues, pipe.execute(), strict=True)}

    def ping(self) -> None:
        self.client.ping()


_ledger: Ledger | None = None
_ledger_pid = 0
_ledger_lock = threading.Lock()


def _process_ledger(app: Any) -> Ledger:
    global _ledger, _ledger_pid
    with _ledger_lock:
        if _ledger is None or _ledger_pid != os.getpid():
            _ledger, _ledger_pid = Ledger(app), os.getpid()
        return _ledger


# --- per-task events, batched ---------------------------------------------------------

#: How long a per-task event may wait to share one write with the next ones. 20 ms cost the
#: supervisor 26 us of CPU per no-op task (it shares the pod's cores with the worker); 100 ms,
#: 11 us (bench/celery_overhead.py).
_EVENT_BATCH_DELAY: Final = 0.1


class _TaskEvents:
    """The per-task events (job_started, job_finished, checkpoint_saved) of one process.

    Each write on the supervisor's socket wakes the supervisor: about 100 us of the task's own
    time on a small VM, twice per task, a fifth of a no-op task's cost in bare Celery, and as
    much again in the supervisor. So an event goes out at once only when nothing went out in
    the last _EVENT_BATCH_DELAY (an idle worker reports at once); under load a flusher thread
    writes what gathered, in one write, at most that much later; a job that started and
    succeeded within one batch is reported by its job_finished alone (the supervisor would
    add it to its in-flight deliveries and remove it at once; the metrics are the same); and
    consecutive job_finished go as one jobs_finished event (one JSON line to decode).
    The delay is harmless: the supervisor uses these events for metrics and to know which
    deliveries to release if the worker dies, and a delivery it does not know of yet is
    released by the worker itself (_release_all) or by crash recovery. Control events
    (worker_ready, heartbeat, worker_stopping...) do not come through here; the main process
    flushes this buffer before its own last events and before it exits.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.client = events_module.client("celery-executor")
        # (event type, wall time, fields), encoded when written: a job_started whose
        # job_finished comes in the same batch is never encoded at all.
        self._queue: collections.deque[tuple[str, float, dict[str, Any]]] = collections.deque()
        self._wake = threading.Event()
        self._last_write = 0.0
        self._flusher: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self.client.connected

    def send(self, event_type: events_module.EventType, **fields: Any) -> None:
        if not self.client.connected:
            return
        # deque.append and popleft are atomic: executor threads (the threads pool) and the
        # flusher share the queue without a lock.
        self._queue.append((event_type, time.time(), fields))
        if time.monotonic() - self._last_write >= _EVENT_BATCH_DELAY:
            self.flush()
        elif not self._wake.is_set():
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_later, name="workerkit-events", daemon=True
                )
                self._flusher.start()
            self._wake.set()

    def flush(self) -> None:
        # The client's send lock: its other events are never written in the middle of ours,
        # and of two flushes, the one that took the older events writes them first.
        with self.client.writer() as write:
            if write is None:
                self._queue.clear()
                return
            batch = []
            with contextlib.suppress(IndexError):
                while True:
                    batch.append(self._queue.popleft())
            if not batch:
                return
            self._last_write = time.monotonic()
            write(self._encode(batch))

    def _encode(self, batch: list[tuple[str, float, dict[str, Any]]]) -> bytes:
        """The batch's lines: consecutive job_finished as one jobs_finished event.

        A job_started whose job_finished follows in the same batch is left out: the supervisor
        would add the delivery to those in flight and remove it at once. Only *consecutive*
        job_finished are merged, so a job finished, requeued and started again within one
        batch still reads in that order.
        """
        done = {
            fields.get("job_id")
            for kind, _, fields in batch
            if kind == "job_finished" and fields.get("outcome") == "succeeded"
        }
        pid = self.pid
        lines: list[bytes] = []
        finished: list[list[Any]] = []
        for kind, ts, fields in batch:
            if kind == "job_finished":
                finished.append(
                    [
                        fields.get("job_id"),
                        fields.get("task"),
                        fields.get("queue"),
                        fields.get("outcome"),
                        fields.get("duration"),
                    ]
                )
                continue
            if kind == "job_started" and fields.get("job_id") in done:
                continue
            if finished:
                lines.append(_encode_finished(pid, finished))
                finished = []
            lines.append(_encode_line({"type": kind, "pid": pid, "ts": ts, **fields}))
        if finished:
            lines.append(_encode_finished(pid, finished))
        return b"".join(lines)

    def _flush_later(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(_EVENT_BATCH_DELAY)
            self._wake.clear()
            self.flush()


#: events.encode's format (one JSON object a line), with one encoder for every event.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), default=str)


def _encode_line(message: dict[str, Any]) -> bytes:
    return _ENCODER.encode(message).encode() + b"\n"


def _encode_finished(pid: int, jobs: list[list[Any]]) -> bytes:
    return _encode_line({"type": "jobs_finished", "pid": pid, "ts": time.time(), "jobs": jobs})


_task_events: _TaskEvents | None = None


def _events() -> _TaskEvents:
    """This process's per-task event sender (a forked pool child makes its own)."""
    global _task_events
    current = _task_events
    if current is None:
        current = _task_events = _TaskEvents()
    return current


def _forget_parent_events() -> None:
    # A forked pool child must not write into its parent's buffer and connection. Dropping the
    # sender at fork spares every task an os.getpid() (a system call since glibc 2.25).
    global _task_events
    _task_events = None


os.register_at_fork(after_in_child=_forget_parent_events)


def _flush_events() -> None:
    current = _task_events  # never the parent's in a forked child (_forget_parent_events)
    if current is not None:
        current.flush()


# --- inside the task: the job context ---------------------------------------------------

#: Set in a process once the supervisor asked its jobs to stop: a task starting later starts
#: with stop_requested already true.
_stop_requested = threading.Event()


def _on_command_in_executor(command: str, message: Mapping[str, Any]) -> None:
    if command == "request_stop":
        _stop_requested.set()
        request_stop_all()


def _delivery_tag(request: Any) -> str | None:
    info = getattr(request, "delivery_info", None) or {}
    tag = info.get("delivery_tag")
    if tag is None:
        tag = (getattr(request, "properties", None) or {}).get("delivery_tag")
    return str(tag) if tag is not None else None


class AttemptsExhausted(Exception):
    """The task's worker died ``workerkit_max_attempts`` times while running it: failed."""


class _CeleryJobContext(JobContext):
    """A job context whose checkpoint is read (and fence taken) on first use, not at start.

    Most tasks never touch a checkpoint: they cost no Redis round trip of workerkit's own.
    """

    def __init__(self, *, app: Any, generation: Generation, **kwargs: Any) -> None:
        self._app = app
        self._generation = generation
        # Set once this attempt read or wrote the checkpoint keys (its fence is taken).
        self._claimed = False
        super().__init__(save=self._save_fenced, **kwargs)

    @property
    def checkpoint(self) -> Any:
        if not self._claimed:
            self._claim()
        return super().checkpoint

    def _claim(self) -> None:
        with self._lock:
            if self._claimed:
                return
            try:
                fresh, stored = _process_ledger(self._app).claim_checkpoint(
                    self.job_id, self._generation
                )
            except Exception as exc:  # Redis is briefly unreachable: resume from nothing
                log.warning(
                    "cannot read the checkpoint",
                    extra={"event": "checkpoint_read_failed", "error": str(exc)},
                )
                return
            self._claimed = True
            self._checkpoint = stored
            if not fresh:  # a newer attempt of this task touched the checkpoint
                self._lease_lost = True
                self._stop.set()

    def _save_fenced(self, state: Any) -> None:
        # Called by flush() with self._lock held.
        _process_ledger(self._app).save_checkpoint(self.job_id, self._generation, state)
        self._claimed = True

    def finish(self, checkpointed: bool) -> None:
        """On success: delete the checkpoint and fence, when this task may have any."""
        if self._claimed or checkpointed:
            _process_ledger(self._app).finish(self.job_id, self._generation)


@functools.cache
def _celery_exceptions() -> tuple[Any, Any, Any]:
    # Once: a ``from ... import`` in the hot path runs importlib's Python code every time.
    from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded

    return Reject, Retry, SoftTimeLimitExceeded


def _run_job(task: Any, run: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    Reject, Retry, SoftTimeLimitExceeded = _celery_exceptions()  # noqa: N806

    request = task.request
    job_id = str(request.id)
    queue = str((request.delivery_info or {}).get("routing_key") or "")
    settings = _settings_cache
    if settings is None:
        from workerkit.settings import load_settings

        settings = load_settings()
    # The attempt and the fencing generation come from the message (see GEN_HEADER): no
    # Redis round trip at start.
    retries = _int(request.retries)
    crashes = _int(getattr(request, CRASHES_HEADER, 0))
    attempt = 1 + retries + crashes
    started_at = time.time()
    generation = (retries, _int(getattr(request, GEN_HEADER, 0)), int(started_at * 1000))
    events = _events()
    limit = task.time_limit or settings.job_timeout
    context = _CeleryJobContext(
        app=task.app,
        generation=generation,
        job_id=job_id,
        task=task.name,
        queue=queue,
        attempt=attempt,
        deadline=started_at + float(limit),
        checkpoint_interval=settings.checkpoint_interval,
        on_checkpoint_saved=lambda ctx: events.send(
            "checkpoint_saved", job_id=ctx.job_id, task=ctx.task, queue=ctx.queue
        ),
    )
    if _stop_requested.is_set():
        context.request_stop()
    if events.connected:  # nothing to build for a worker run without a supervisor
        events.send(
            "job_started",
            job_id=job_id,
            task=task.name,
            queue=queue,
            attempt=attempt,
            delivery={
                "job_id": job_id,
                "delivery_tag": _delivery_tag(request),
                "queue": queue,
                "worker": _runtime.worker_id if _runtime is not None else "",
            },
            queued_for=None,
        )
    started = time.monotonic()
    outcome = "failed"
    try:
        max_attempts = _int(getattr(task, "workerkit_max_attempts", None)) or DEFAULT_MAX_ATTEMPTS
        if crashes >= max_attempts:
            # A poison message: every run so far killed its worker (an out-of-memory kill, a
            # segfault). Celery's max_retries does not see these (a redelivery is not a
            # retry): fail it now, without running it, through Celery's own failure path
            # (result backend, task_failure, the ack).
            log.error(
                "task failed: its worker died on every attempt",
                extra={
                    "event": "job_attempts_exhausted",
                    "job_id": job_id,
                    "task": task.name,
                    "crashes": crashes,
                    "max_attempts": max_attempts,
                },
            )
            raise AttemptsExhausted(
                f"workerkit: the worker died {crashes} times running task {task.name} "
                f"{job_id} (workerkit_max_attempts={max_attempts})"
            )
        with context.activate():
            result = run(*args, **kwargs)
    except ReleaseJob:
        outcome = "released"
        # Reject with requeue: the main process puts the message back in its queue now (see
        # _WorkerkitRequest.reject), and acknowledges nothing. The attempt is not counted:
        # only a crash adds to it.
        raise Reject("released by the job (workerkit)", requeue=True) from None
    except IdempotencyInProgress as exc:
        outcome = "retried"
        countdown = max(1.0, min(exc.retry_after or 5.0, 60.0))
        raise task.retry(exc=exc, countdown=countdown) from None
    except Retry:
        outcome = "retried"
        raise
    except SoftTimeLimitExceeded:
        outcome = "timed_out"
        raise
    except LeaseLost:
        outcome = "lease_lost"
        raise
    else:
        outcome = "succeeded"
        try:
            context.finish(bool(getattr(task, "workerkit_checkpointed", False)))
        except Exception as exc:  # the keys expire anyway (_KEY_RETENTION)
            log.warning(
                "cannot delete the checkpoint",
                extra={"event": "checkpoint_delete_failed", "job_id": job_id, "error": str(exc)},
            )
        return result
    finally:
        events.send(
            "job_finished",
            job_id=job_id,
            task=task.name,
            queue=queue,
            outcome=outcome,
            duration=time.monotonic() - started,
        )


def wrap_tasks(app: Any) -> None:
    """Run every user task of ``app`` with a job context (before the worker builds tracers).

    Every task, Celery's own (``celery.*``) included, gets workerkit's Request class: that is
    how the worker knows which messages it holds (see _WorkerkitRequestMixin).
    """
    for task in app.tasks.values():
        # Celery's documented hook for custom requests ("Task.Request"); the worker's
        # strategy subclasses it once per task, so the user's own Request class still works.
        task.Request = _request_class(task.Request)
    for task in _user_tasks(app):
        if getattr(task, "_workerkit_original_run", None) is not None:
            continue
        original = task.run

        def run(
            *args: Any, _task: Any = task, _run: Callable[..., Any] = original, **kwargs: Any
        ) -> Any:
            return _run_job(_task, _run, args, kwargs)

        functools.update_wrapper(run, original)
        task._workerkit_original_run = original
        # An instance attribute shadows the class's ``run``; Celery's tracer reads task.run
        # when it is built (in the main process for solo/threads, in each pool child).
        task.run = run


_request_classes: dict[Any, type[Any]] = {}


def _request_class(base_spec: Any) -> type[Any]:
    """A subclass of the task's Request whose requeues go through :meth:`Ledger.restore`."""
    from celery.utils.imports import symbol_by_name

    base: type[Any] = symbol_by_name(base_spec)
    if issubclass(base, _WorkerkitRequestMixin):
        return base
    cls = _request_classes.get(base)
    if cls is None:
        cls = type(f"Workerkit{base.__name__}", (_WorkerkitRequestMixin, base), {})
        _request_classes[base] = cls
    return cls


class _WorkerkitRequestMixin:
    """Requeues (a job's release, a lost pool child) by workerkit's restore, not kombu's.

    kombu's reject-with-requeue puts the payload back unchanged: a pool child killed by its
    task (out of memory, a segfault) would be redelivered forever with nothing counting, and a
    missing binding key drops the message (see Ledger._route). Ours counts the crash in the
    message (CRASHES_HEADER, so that the next run fails a poison message) and bumps the fencing
    generation, in the transaction that moves the message.
    """

    # Celery's Request has these (it is the other base).
    id: str
    message: Any
    acknowledged: bool
    send_event: Callable[..., Any]

    _workerkit_crashed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        base: Any = super()
        base.__init__(*args, **kwargs)
        # Held from here until acknowledged or requeued. Celery's task_received signal would
        # tell the same a little later, at several microseconds per message for its dispatch.
        runtime = _runtime
        if runtime is not None:
            runtime.hold(self)

    def acknowledge(self) -> None:
        base: Any = super()
        base.acknowledge()
        if _runtime is not None:
            _runtime.forget(self)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        from celery.exceptions import WorkerLostError

        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
        # Celery rejects with requeue for these when the pool child was lost (and
        # task_reject_on_worker_lost); a Reject raised by the job (a release) is not a crash.
        self._workerkit_crashed = isinstance(exc, WorkerLostError | SystemExit | KeyboardInterrupt)
        base: Any = super()
        return base.on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def reject(self, requeue: bool = False) -> None:
        base: Any = super()
        runtime = _runtime
        if not requeue or self.acknowledged or runtime is None:
            base.reject(requeue=requeue)
            if runtime is not None:
                runtime.forget(self)
            return
        message = self.message
        try:
            restored = _process_ledger(runtime.app).restore(
                str(message.delivery_tag),
                owners=(runtime.worker_id,),
                crashed=self._workerkit_crashed,
                leftmost=True,  # at the back of the queue, as kombu's reject does
            )
        except Exception as exc:
            log.warning(
                "cannot requeue through workerkit; kombu requeues",
                extra={"event": "requeue_failed", "job_id": self.id, "error": str(exc)},
            )
            base.reject(requeue=requeue)
            return
        # Settle the message in kombu's in-memory QoS only (that frees its prefetch slot): its
        # entries in Redis are gone and must not be removed again, since a redelivery of the
        # same message keeps the same delivery tag (on another worker, possibly, by now).
        with contextlib.suppress(Exception):
            message.channel.qos._quick_ack(message.delivery_tag)
        with contextlib.suppress(Exception):
            message._state = "REQUEUED"
        self.acknowledged = True
        runtime.forget(self)
        with contextlib.suppress(Exception):
            self.send_event("task-rejected", requeue=True)
        if not restored:
            log.warning(
                "message not requeued: acknowledged, held by another worker, or no queue",
                extra={"event": "requeue_skipped", "job_id": self.id},
            )


_settings_cache: Settings | None = None


# --- the main process -------------------------------------------------------------------


class _Runtime:
    """workerkit inside the Celery worker's main process: drain, release, leases, events."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.window = settings.recovery_window
        self.lease_ttl = self.window / 2
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.events = events_module.client("celery-worker")
        self.consumer: Any = None
        self.draining = False
        self._held: dict[str, Any] = {}  # tag -> Request, every message this worker holds
        self._held_lock = threading.Lock()
        self._handed_back: set[str] = set()
        self._wake_r, self._wake_w = os.pipe()
        self._release_lock = threading.Lock()
        self._started = False
        self._last_settled = 0.0  # monotonic time of the last message settled (forget())

    # --- hooks from Celery ----------------------------------------------------------------

    def attach(self, consumer: Any) -> None:
        """Called as the consumer is built: gate its dispatch to the pool."""
        self.consumer = consumer
        dispatch = consumer.on_task_request

        def gate(request: Any) -> None:
            # Runs on the consumer's loop thread. After SIGTERM nothing new starts: a message
            # that arrives, or whose ETA comes, is handed back instead.
            if self.draining:
                self._hand_back(request)
                return
            dispatch(request)

        consumer.on_task_request = gate

    def hold(self, request: Any) -> None:
        """A message reached this worker (its Request was built): it is held until settled."""
        tag = self._tag(request)
        if tag is None:
            return
        request._workerkit_tag = tag  # for forget(), once per message
        with self._held_lock:
            self._held[tag] = request
        # A message that came in after SIGTERM and waits for an ETA would never reach the gate
        # before we exit: hand it back now (the gate does it for the others).
        if self.draining and request.eta:
            self._hand_back(request)

    def forget(self, request: Any) -> None:
        """The message left this worker's hands (acknowledged or requeued): stop holding it.

        Done at once rather than by the keeper's next prune: a Request kept a few seconds
        longer survives into the garbage collector's old generations, and at a thousand
        messages a second those thousands of live objects made every full collection (and so
        every task) slower.
        """
        self._last_settled = time.monotonic()
        tag = getattr(request, "_workerkit_tag", None)
        if tag is not None:
            with self._held_lock:
                self._held.pop(tag, None)

    def on_worker_ready(self) -> None:
        if self._started:
            return
        self._started = True
        self.events.on_command(self._on_command)
        self.events.send(
            "worker_ready",
            engine="celery",
            queues=list(self._queues()),
            concurrency=self._concurrency(),
        )
        threading.Thread(target=self._keep, name="workerkit-keeper", daemon=True).start()
        threading.Thread(target=self._control, name="workerkit-drain", daemon=True).start()
        log.info(
            "celery worker ready",
            extra={"event": "worker_ready", "worker": self.worker_id, "window": self.window},
        )

    def install_signal_handlers(self) -> None:
        # Replaces Celery's handlers (installed just before): Celery's warm shutdown joins the
        # pool with no bound, and its SIGINT handler turns a second Ctrl-C into a cold shutdown.
        # The handler only writes a byte to a pipe: it runs between two bytecodes of whatever
        # the main thread was doing (kombu's event loop, or the task itself in the solo pool),
        # so it must not take locks or touch the broker connection.
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"T")

    # --- the drain ------------------------------------------------------------------------

    def _control(self) -> None:
        os.read(self._wake_r, 1)
        self.draining = True
        held = self._in_hand()
        self.events.send("worker_stopping", running=len(held))
        log.info("stopped consuming", extra={"event": "worker_stopping", "running": len(held)})
        self._on_loop(self._stop_consuming)
        while True:
            if not self._in_hand():
                self._on_loop(self._exit_now)
                time.sleep(1.0)  # the loop may be busy with a solo task's last ack
                self._exit_now()
            time.sleep(_DRAIN_TICK)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        hub = getattr(self.consumer, "controller", None)
        hub = getattr(hub, "hub", None)
        if hub is not None:
            hub.call_soon(fn)  # wakes the loop (kombu's hub has a waker for other threads)
        else:
            fn()

    def _stop_consuming(self) -> None:
        consumer = self.consumer
        if consumer is not None and consumer.task_consumer is not None:
            with contextlib.suppress(Exception):
                consumer.task_consumer.cancel()
        # Messages waiting for their ETA (or a rate limit) were never given to the pool: hand
        # them back. Those given to the pool are in hand and may finish.
        from celery.worker import state

        for request in list(state.scheduled_requests):
            self._hand_back(request)

    def _hand_back(self, request: Any) -> None:
        tag = self._tag(request)
        if tag is None or tag in self._handed_back or request.acknowledged:
            return
        self._handed_back.add(tag)
        timer_entry = getattr(request, "_eta_timer_entry", None)
        if timer_entry is not None:
            with contextlib.suppress(Exception):
                timer_entry.cancel()
        try:
            restored = _process_ledger(self.app).restore(tag, owners=(self.worker_id,))
        except Exception as exc:
            log.warning(
                "cannot hand a message back; crash recovery will",
                extra={"event": "hand_back_failed", "job_id": request.id, "error": str(exc)},
            )
            return
        # Celery must not ack or reject it later: the message is the queue's again.
        request.acknowledged = True
        with contextlib.suppress(Exception):
            request.message._state = "REQUEUED"
        from celery.worker import state

        with contextlib.suppress(Exception):
            state.task_ready(request)
        log.info(
            "handed a message back to its queue",
            extra={"event": "message_handed_back", "job_id": request.id, "restored": restored},
        )

    def _in_hand(self) -> list[Any]:
        with self._held_lock:
            for tag, request in list(self._held.items()):
                if request.acknowledged or tag in self._handed_back:
                    del self._held[tag]
            return list(self._held.values())

    def _exit_now(self) -> None:
        if self._in_hand():
            return
        _flush_events()
        if _pool_pids(self.consumer):
            # Pool children write their last job_finished events within _EVENT_BATCH_DELAY of
            # them; the acks (and so forget()) happen here in the main process, right after.
            time.sleep(max(0.0, self._last_settled + _EVENT_BATCH_DELAY * 1.5 - time.monotonic()))
        self._kill_pool()
        log.info("drained", extra={"event": "worker_drained"})
        logging.shutdown()
        os._exit(0)

    def _kill_pool(self) -> list[int]:
        pids = _pool_pids(self.consumer)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return pids

    # --- commands -------------------------------------------------------------------------

    def _on_command(self, command: str, message: Mapping[str, Any]) -> None:
        if command == "request_stop":
            _on_command_in_executor(command, message)  # jobs of the threads and solo pools
            log.info("stop requested for running jobs", extra={"event": "jobs_stop_requested"})
        elif command == "release":
            self._release_all()

    def _release_all(self) -> None:
        """The release deadline: kill what runs, put every message in hand back, exit 0."""
        with self._release_lock:
            self.draining = True
            # Kill the pool children first: a message must not be back in its queue (where
            # another worker can start it) while its first run still goes on. Jobs of the solo
            # and threads pools run in this process and end with it, a moment later; their
            # checkpoint writes are fenced by the next attempt's token.
            killed = self._kill_pool()
            # A solo or threads job's job_started may still be in the buffer: it must reach
            # the supervisor before the job_finished "released" below.
            _flush_events()
            ledger = _process_ledger(self.app)
            released = 0
            for request in self._in_hand():
                tag = self._tag(request)
                if tag is None:
                    continue
                try:
                    ok = ledger.restore(tag, owners=(self.worker_id,))
                except Exception as exc:
                    log.warning(
                        "cannot release a message; crash recovery will",
                        extra={"event": "release_failed", "job_id": request.id, "error": str(exc)},
                    )
                    continue
                released += ok
                self.events.send(
                    "job_finished",
                    job_id=str(request.id),
                    task=request.name,
                    queue=str(request.delivery_info.get("routing_key") or ""),
                    outcome="released",
                    duration=0.0,
                )
            log.info(
                "released unfinished jobs",
                extra={"event": "worker_released", "released": released, "killed": killed},
            )
            logging.shutdown()
            os._exit(0)

    # --- the keeper: heartbeats, health, leases, crash recovery ----------------------------

    def _keep(self) -> None:
        renew_every = max(0.2, self.window / 6)
        scan_every = max(0.5, self.window / 4)
        next_beat = next_health = next_renew = next_scan = 0.0
        while True:
            now = time.monotonic()
            try:
                if now >= next_renew:
                    next_renew = now + renew_every
                    held = self._in_hand()
                    tags = [t for t in (self._tag(r) for r in held) if t is not None]
                    if tags:
                        _process_ledger(self.app).refresh_leases(
                            tags, self.worker_id, self.lease_ttl
                        )
                if now >= next_beat:
                    next_beat = now + _HEARTBEAT_EVERY
                    self.events.send("heartbeat", running=len(self._in_hand()))
                if now >= next_health:
                    next_health = now + _HEALTH_EVERY
                    self._report_health()
                if now >= next_scan and not self.draining:
                    next_scan = now + scan_every
                    self._recover()
            except Exception as exc:
                log.warning(
                    "keeper step failed", extra={"event": "keeper_failed", "error": str(exc)}
                )
                self.events.send("store_health", ok=False, reason=f"broker: {type(exc).__name__}")
            # Sleep until the next step is due: nothing here runs per task.
            due = min(next_renew, next_beat, next_health, next_scan)
            time.sleep(min(max(0.05, due - time.monotonic()), 1.0))

    def _report_health(self) -> None:
        ledger = _process_ledger(self.app)
        ledger.ping()
        self.events.send("store_health", ok=True, reason="ok")
        with contextlib.suppress(Exception):
            self.events.send(
                "queue_stats", depth=ledger.depths(self._queues()), oldest_ready_age={}
            )

    def _recover(self) -> None:
        ledger = _process_ledger(self.app)
        for tag in ledger.abandoned(time.time() - self.lease_ttl):
            task_id = ledger.task_id_of(tag)
            # The owner died: the run (if it had started) counts as an attempt.
            if ledger.restore(tag, crashed=True):
                log.warning(
                    "restored the message of a worker that died",
                    extra={"event": "message_recovered", "job_id": task_id, "tag": tag},
                )

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _tag(request: Any) -> str | None:
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        return str(tag) if tag is not None else None

    def _queues(self) -> list[str]:
        consumer = self.consumer
        with contextlib.suppress(Exception):
            return [q.name for q in consumer.task_consumer.queues]
        return list(self.settings.queues)

    def _concurrency(self) -> int:
        with contextlib.suppress(Exception):
            return int(self.consumer.pool.num_processes)
        return self.settings.concurrency


def _pool_pids(consumer: Any) -> list[int]:
    pool = getattr(getattr(consumer, "pool", None), "_pool", None)
    processes = getattr(pool, "_pool", None) or []
    return [int(p.pid) for p in processes if getattr(p, "pid", None)]


_runtime: _Runtime | None = None


def _install(app: Any, settings: Settings) -> _Runtime:
    """Hook workerkit into the app's worker: a consumer bootstep, signals, a Worker subclass."""
    from celery import bootsteps
    from celery import signals as celery_signals

    global _runtime, _settings_cache
    runtime = _Runtime(app, settings)
    _runtime, _settings_cache = runtime, settings

    class WorkerkitStep(bootsteps.StartStopStep):  # type: ignore[misc]
        """Gates the consumer's dispatch to the pool (see _Runtime.attach)."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            runtime.attach(parent)

    app.steps["consumer"].add(WorkerkitStep)

    def on_ready(sender: Any = None, **_: Any) -> None:
        runtime.on_worker_ready()

    def on_child_start(**_: Any) -> None:
        # A pool child: the pod's SIGTERM is the supervisor's to handle, and a Ctrl-C reaches
        # the whole foreground group; neither may kill a task mid-run. Celery's hard time limit
        # still works (billiard follows its SIGTERM with SIGKILL after 0.1 s).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        events_module.client("celery-executor").on_command(_on_command_in_executor)

    celery_signals.worker_ready.connect(on_ready, weak=False)
    celery_signals.worker_process_init.connect(on_child_start, weak=False)

    base = app.Worker

    class Worker(base):  # type: ignore[misc,valid-type]
        def on_init_blueprint(self) -> None:
            super().on_init_blueprint()  # imports the task modules and finalizes the app
            wrap_tasks(self.app)

        def install_platform_tweaks(self, worker: Any) -> None:
            super().install_platform_tweaks(worker)
            runtime.install_signal_handlers()

    app.Worker = Worker
    # Jobs of the solo and threads pools run in this process: they hear commands here.
    return runtime


def worker_argv(settings: Settings, worker_args: Sequence[str]) -> list[str]:
    """``celery worker`` options: workerkit's settings first, the user's own after (they win)."""
    argv = [
        "worker",
        f"--loglevel={settings.log_level.upper()}",
        f"--concurrency={settings.concurrency}",
        # Mingle waits a second for replies at start; gossip and worker heartbeats are broadcast
        # chatter workerkit does not use (the supervisor has its own probes).
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]
    if not any(a in ("-Q", "--queues") or a.startswith("--queues=") for a in worker_args):
        argv.append(f"--queues={','.join(settings.queues)}")
    return [*argv, *worker_args]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m workerkit.engines.celery [celery worker options]``, started by the supervisor."""
    from workerkit.logs import configure_logging
    from workerkit.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = load_celery_app(settings.app)
        configure_app(app, settings)
        _install(app, settings)
    except ConfigurationError as exc:
        log.error(str(exc), extra={"event": "worker_config_error"})
        sys.exit(2)
    app.worker_main(argv=worker_argv(settings, list(sys.argv[1:] if argv is None else argv)))


# --- the engine, as the supervisor sees it ----------------------------------------------


class CeleryEngine:
    """The celery engine (:class:`~workerkit.engines.base.Engine`)."""

    name = "celery"

    def __init__(self, worker_args: Sequence[str] = ()) -> None:
        self.worker_args = list(worker_args)
        self._app: Any = None

    def worker_command(self, settings: Settings) -> list[str]:
        """The Celery worker with workerkit inside, in a fresh interpreter."""
        return [sys.executable, "-m", "workerkit.engines.celery", *self.worker_args]

    def _load(self, settings: Settings) -> Any:
        if self._app is None:
            app = load_celery_app(settings.app)
            configure_app(app, settings)
            self._app = app
        return self._app

    def app_timing(self, settings: Settings) -> AppTiming:
        """The tasks' time limits and the app's overrides of workerkit's Celery defaults."""
        if not settings.app:
            return AppTiming()
        app = load_celery_app(settings.app)
        facts = celery_facts(app)  # before configure_app fills in workerkit's values
        timings = task_timings(app)
        configure_app(app, settings)
        self._app = app
        return AppTiming(tasks=timings, celery=facts)

    def release_in_flight(
        self, settings: Settings, refs: Sequence[Mapping[str, Any]], *, crashed: bool = False
    ) -> int:
        """Restore the messages of a worker that was killed (or died); return how many.

        A message is restored only while its lease is gone or still the dead worker's: one that
        was restored and redelivered since (its lease is another worker's) is left alone.
        """
        if not refs:
            return 0
        ledger = Ledger(self._load(settings))
        released = 0
        try:
            for ref in refs:
                tag, worker = ref.get("delivery_tag"), str(ref.get("worker") or "")
                if not tag:
                    continue
                try:
                    if ledger.restore(str(tag), owners=(worker,), crashed=crashed):
                        released += 1
                except Exception as exc:
                    log.warning(
                        "cannot release a message; crash recovery will",
                        extra={"event": "release_failed", "error": str(exc)},
                    )
                    break
        finally:
            ledger.close()
        return released


if __name__ == "__main__":
    main()
