"""The task consumer's pop, made reliable: no message popped by this worker is lost in transit.

Every pop moves the entry, in Redis, from its queue to this worker's in-flight list
(pop_scan.lua, or a BLMOVE when every key was empty); the delivery takes it out of there in one
step (pop_deliver.lua, from delivery.py), and what a lost reply left in flight goes back to its
queue. The whole design: docs/engines/celery.md ("The pop").
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from importlib import resources
from queue import Empty
from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.celery.ledger import Ledger
from workerkit.engines.celery.poison import refusal
from workerkit.errors import ConfigurationError

if TYPE_CHECKING:
    from workerkit.engines.presence import PausedQueues

__all__ = (
    "BLOCK_AT_MOST",
    "INFLIGHT_PREFIX",
    "MIN_REDIS",
    "InFlight",
    "Reclaimed",
    "recover_abandoned",
    "recover_in_flight",
    "reliable_pop",
    "require_lmove",
)

log = logging.getLogger("workerkit.engines.celery")

#: An in-flight list: ``workerkit:celery:inflight:<worker id>:<queue key>``.
INFLIGHT_PREFIX: Final = "workerkit:celery:inflight:"
#: The registry of in-flight lists (hash: list key -> {"owner", "queue"}), for crash recovery.
REGISTRY: Final = "workerkit:celery:inflights"
#: The owners crash recovery found gone (sorted set: owner -> since when, ms, Redis's clock).
GONE: Final = "workerkit:celery:inflights:gone"
#: A gone owner's lists leave the registry after this many liveness TTLs (until then every
#: recovery pass looks at them again: a blocking pop it sent before it was found gone may land).
FORGET_AFTER_TTLS: Final = 10
#: The oldest Redis with LMOVE and BLMOVE.
MIN_REDIS: Final = (6, 2)
#: A worker's liveness key (its id, expiring after the lease TTL): set by every lease round,
#: and by a scan that finds half of its TTL gone (so always fresh when a blocking pop starts).
#: Gone: the worker is gone (or stopped past its lease), its lists go back; found gone by the
#: worker itself (it was stopped), its lists are registered again.
ALIVE_PREFIX: Final = "workerkit:celery:alive:"
#: The longest a blocking pop waits (on one queue's main key) before the next scan of every
#: key: a message on another key (another queue, a priority) waits at most this long.
BLOCK_AT_MOST: Final = 1.0


def _lua(name: str) -> str:
    return resources.files("workerkit.engines.celery").joinpath(name).read_text()


_SCAN: Final = _lua("pop_scan.lua")
_DELIVER: Final = _lua("pop_deliver.lua")
_RETURN: Final = _lua("pop_return.lua")
_REFUSE: Final = _lua("pop_refuse.lua")
_ALIVE: Final = _lua("pop_alive.lua")
_REQUEUE: Final = _lua("pop_requeue.lua")
#: How often a stale entry (pop_scan.lua) may come back undelivered before it is dead-lettered.
STALE_TRIES: Final = 3


class Reclaimed(Exception):
    """The popped entry was put back in its queue before its delivery was written."""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class InFlight:
    """One worker's in-flight lists (main process; the consumer's loop thread pops)."""

    def __init__(
        self, owner: str, ttl: float, prefix: str = "", paused: PausedQueues | None = None
    ) -> None:
        self.owner = owner
        self.ttl_ms = max(1, int(ttl * 1000))
        #: A blocking pop returns (empty) at least this often, within the liveness TTL. Its bound
        #: counts from when Redis reads it, so one sent late (the worker stopped before it sent
        #: it) can still land after a recovery found the worker gone: recovery keeps a gone
        #: worker's lists registered for FORGET_AFTER_TTLS, and the worker registers them again.
        self.block_for = max(0.05, min(BLOCK_AT_MOST, ttl / 4))
        self.prefix = prefix
        #: The pause set (the dashboard's), read at most every PAUSE_REFRESH s: a scan and a
        #: blocking pop leave paused queues out; None: every queue is consumed.
        self.paused = paused
        self._lists: dict[str, str] = {}  # in-flight list -> its queue key (both prefixed)
        self._records: dict[str, str] = {}
        self._lock = threading.Lock()
        self.checked = False  # the server's version (require_lmove)

    @property
    def alive_key(self) -> str:
        return self.prefix + ALIVE_PREFIX + self.owner

    @property
    def registry(self) -> str:
        return self.prefix + REGISTRY

    @property
    def gone(self) -> str:
        return self.prefix + GONE

    def list_for(self, source: str) -> str:
        """The in-flight list of the queue key ``source`` (unprefixed); prefixed."""
        key = self.prefix + INFLIGHT_PREFIX + self.owner + ":" + source
        with self._lock:
            self._lists[key] = self.prefix + source
        return key

    def record(self, source: str) -> str:
        """The registry's record of the in-flight list of ``source``: its owner, its queue."""
        found = self._records.get(source)
        if found is None:
            found = json.dumps({"owner": self.owner, "queue": self.prefix + source})
            self._records[source] = found
        return found

    def keep_alive(self, client: Any) -> None:
        """The keeper's round: this worker is alive (a busy worker pops rarely); pop_alive.lua
        registers its lists again when its liveness key was gone."""
        with self._lock:
            lists = list(self._lists.items())
        keys = [self.alive_key, self.registry, self.gone, *(k for k, _ in lists)]
        records = [json.dumps({"owner": self.owner, "queue": q}) for _, q in lists]
        args = [self.owner, self.ttl_ms, *records]
        client.execute_command("EVAL", _ALIVE, len(keys), *keys, *args)

    def give_back(self, client: Any) -> int:
        """Every entry in this worker's in-flight lists back to the head of its queue: only
        when no reply of a pop can still reach this worker (a new connection; a sealed
        consumer at release)."""
        with self._lock:
            pairs = [k for pair in self._lists.items() for k in pair]
        if not pairs:
            return 0
        keys = [self.registry, self.alive_key, self.gone, *pairs]
        args = ["own", self.owner, 0]
        moved = int(client.execute_command("EVAL", _RETURN, len(keys), *keys, *args) or 0)
        if moved:
            log.warning(
                "messages whose pop reply was lost are back in their queues",
                extra={"event": "pop_returned", "messages": moved},
            )
        return moved

    def forget(self, client: Any, inflight: str, raw: bytes) -> None:
        """kombu took the entry without an ``unacked`` entry (a no-ack consumer, or its
        reject put it back itself): it leaves the in-flight list."""
        client.execute_command("LREM", inflight, 1, raw)

    def deliver(self, qos: Any, popped: tuple[str, bytes], tag: str, record: str) -> bool:
        """pop_deliver.lua, with kombu's ``QoS``'s keys: False when the entry was put back
        in its queue meanwhile (then it is not delivered here)."""
        inflight, raw = popped
        p = self.prefix
        index, unacked = p + str(qos.unacked_index_key), p + str(qos.unacked_key)
        keys = [inflight, index, unacked, p + Ledger.key("lease", tag)]
        args = [raw, tag, time.time(), record, self.owner, self.ttl_ms]
        with qos.channel.conn_or_acquire() as client:
            return bool(client.execute_command("EVAL", _DELIVER, len(keys), *keys, *args))

    def refuse(self, client: Any, inflight: str, raw: bytes, dead: str, record: str) -> bool:
        """pop_refuse.lua: the entry leaves its in-flight list for the dead-letter list."""
        keys = [inflight, self.prefix + dead]
        return bool(client.execute_command("EVAL", _REFUSE, 2, *keys, raw, record))

    def requeue(self, client: Any, inflight: str, source: str, raw: bytes) -> bool:
        """pop_requeue.lua: the entry back to the head of its queue key ``source``."""
        keys = [inflight, self.prefix + source]
        return bool(client.execute_command("EVAL", _REQUEUE, 2, *keys, raw))


class _Pending:
    """The pop sent on the consumer's connection, whose reply the loop reads next."""

    def __init__(self, command: str, sources: list[str], blocked_on: int | None) -> None:
        self.command = command
        self.sources = sources  # the queue keys, unprefixed, in kombu's order
        self.blocked_on = blocked_on  # BLMOVE: the index of its queue key

    def found(self, reply: Any) -> tuple[str, bytes, bool] | None:
        """The queue key, the entry, and whether it was stale (already in flight)."""
        if not reply:
            return None
        if self.blocked_on is not None:
            return self.sources[self.blocked_on], bytes(reply), False
        index, raw, stale = reply
        return self.sources[int(index) - 1], bytes(raw), bool(int(stale))


def reliable_pop(channel: Any, flight: InFlight, dead_letter: Callable[..., None]) -> None:
    """Replace kombu's BRPOP on the task consumer's ``channel`` (once per channel): kombu's
    hub calls ``_brpop_start`` (send a pop) and, once the socket is readable, its BRPOP
    handler (read the reply, deliver); an error event reads the reply too."""
    if getattr(channel, "_workerkit_pop", None) is flight:
        return
    if not flight.checked:  # ConfigurationError: worker.py refuses to start
        with contextlib.suppress(*channel.connection_errors):  # else: at the next start
            require_lmove(channel.client)
            flight.checked = True
    popper = _Popper(channel, flight, dead_letter)
    poll_error = channel._poll_error

    def on_poll_error(kind: str, **options: Any) -> Any:
        if kind != "BRPOP":
            return poll_error(kind, **options)
        with contextlib.suppress(Empty):
            popper.read(**options)  # a reply there is delivered, not dropped
        return None

    channel._brpop_start = popper.start
    channel._brpop_read = popper.read
    channel._poll_error = on_poll_error
    channel.handlers["BRPOP"] = popper.read
    channel._workerkit_pop = flight


class _Popper:
    """The pops of one kombu channel: a scan of every key, then, when all were empty, one
    blocking BLMOVE (on one queue's main key, in turn), then a scan again."""

    def __init__(self, channel: Any, flight: InFlight, dead_letter: Callable[..., None]) -> None:
        from kombu.utils.json import loads

        self.channel = channel
        self.flight = flight
        self.dead_letter = dead_letter
        self.loads: Callable[[str], Any] = loads
        self.sep = str(getattr(channel, "sep", "\x06\x16"))
        #: kombu drops a BRPOP connection whose reply is later than its ``brpop_timeout`` plus
        #: its health check interval: a blocking pop waits no longer than kombu's would.
        self.block_for = min(flight.block_for, float(channel.brpop_timeout or BLOCK_AT_MOST))
        self.pending: _Pending | None = None
        self.block = False  # the last scan found every key empty
        self.pause = False  # the last pop failed (a refused script): wait before the next
        self.turn = 0
        #: The queue key whose in-flight list the last empty scan registered: the only key a
        #: blocking pop may wait on (a key the queue set no longer has: a scan again).
        self.armed: str | None = None
        self.stale: dict[bytes, int] = {}  # a stale entry -> how often the scan returned it

    def start(self, timeout: Any = None) -> None:
        channel, flight = self.channel, self.flight
        connection: Any = channel.client.connection
        sock = getattr(connection, "_sock", None)
        if sock is not None and getattr(connection, "_workerkit_pop_sock", None) is not sock:
            # A new connection: a reply of a pop on the old one can no longer come.
            from redis.exceptions import ResponseError

            try:
                with channel.conn_or_acquire() as client:
                    flight.give_back(client)
            except ResponseError as exc:  # left in flight, safe: tried again at the next pop
                log.warning("the pop failed", extra={"event": "pop_failed", "error": str(exc)})
            else:
                connection._workerkit_pop_sock = sock
            self.block = False
        queues = channel._queue_cycle.consume(len(channel.active_queues))
        if not queues:
            return
        if flight.paused is not None:
            queues = flight.paused.active(queues)
        sources = [channel._q_for_pri(q, pri) for pri in channel.priority_steps for q in queues]
        lists = [flight.list_for(s) for s in sources]
        p = flight.prefix
        if self.pause or not queues:
            # A blocking wait on a key nobody writes: a second without popping, no busy loop,
            # and the loop stays free (a full Redis refuses the pop's writes, not this read).
            # Also while every queue is paused: the worker idles, and looks again after it.
            self.pause = False
            pending = _Pending("BLPOP", sources, None)
            args: list[Any] = ["BLPOP", flight.alive_key + ":pause", self.block_for]
        elif self.block and self.armed in sources:
            self.turn += 1
            at = sources.index(str(self.armed))  # the key (and list) the scan registered
            pending = _Pending("BLMOVE", sources, at)
            args = ["BLMOVE", p + sources[at], lists[at], "RIGHT", "LEFT"]
            args.append(self.block_for)
        else:
            at = (self.turn + 1) % len(queues)  # the main key the next BLMOVE waits on
            self.armed = sources[at]
            pending = _Pending("EVAL", sources, None)
            keys = [flight.alive_key, flight.registry, flight.gone]
            keys += [*(p + s for s in sources), *lists]
            args = ["EVAL", _SCAN, len(keys), *keys, flight.owner, flight.ttl_ms, at + 1]
            args += [flight.record(s) for s in sources]
        self.pending = pending
        channel._in_poll = connection
        channel._brpop_sent_at = time.monotonic()
        connection.send_command(*args)

    def read(self, **options: Any) -> bool:
        from redis.exceptions import ResponseError

        channel = self.channel
        pending, self.pending = self.pending, None
        try:
            if pending is None:
                raise Empty
            connection = channel.client.connection
            try:
                reply = channel.client.parse_response(connection, pending.command, **options)
            except channel.connection_errors:
                connection.disconnect()  # the next round reconnects
                raise
            except ResponseError as exc:
                self.block, self.pause = False, True
                log.warning("the pop failed", extra={"event": "pop_failed", "error": str(exc)})
                raise Empty from None
            self.block = pending.command == "EVAL" and not reply
            found = pending.found(reply) if pending.command != "BLPOP" else None
            if found is None:
                raise Empty
            source, raw, stale = found
            dead_letter = self.dead_letter
            if stale:
                tries = self.stale[raw] = self.stale.get(raw, 0) + 1
                if tries > STALE_TRIES:
                    self.stale.pop(raw)
                    queue = source.rsplit(self.sep, 1)[0]
                    reason = f"left in flight undelivered after {STALE_TRIES} tries"
                    dead_letter(queue, raw, reason, taken_from=self.flight.list_for(source))
                    raise Empty
            _deliver(channel, self.flight, (source, raw), self.sep, self.loads, dead_letter)
            self.stale.pop(raw, None)
            return True
        finally:
            channel._in_poll = None
            flush = getattr(channel, "_flush_brpop_reauth", None)
            if callable(flush):
                flush()


def _deliver(
    channel: Any,
    flight: InFlight,
    popped: tuple[str, bytes],
    sep: str,
    loads: Callable[[str], Any],
    dead_letter: Callable[..., None],
) -> None:
    """Hand a popped entry to kombu: its delivery (kombu's ``QoS.append``, delivery.py) takes
    it out of its in-flight list; a refused entry goes to the dead-letter list instead."""
    source, raw = popped
    inflight = flight.list_for(source)
    queue = source.rsplit(sep, 1)[0]
    reason = refusal(raw, channel.decode_body)
    if reason is not None:
        dead_letter(queue, raw, reason, taken_from=inflight)
        raise Empty
    if queue not in channel.connection._callbacks:  # its consumer was cancelled meanwhile
        with channel.conn_or_acquire() as client:
            flight.requeue(client, inflight, source, raw)
        raise Empty
    channel._queue_cycle.rotate(queue)
    channel._workerkit_popped = (inflight, raw)
    try:
        channel.connection._deliver(loads(raw.decode("utf-8")), queue)
    except Reclaimed:
        log.info(
            "a popped message went back to its queue before its delivery; not delivered here",
            extra={"event": "pop_reclaimed", "queue": queue},
        )
        raise Empty from None
    finally:
        left = channel._workerkit_popped
        channel._workerkit_popped = None
    if left is not None:  # delivered with no unacked entry of ours
        with channel.conn_or_acquire() as client:
            flight.forget(client, inflight, raw)


def require_lmove(client: Any) -> None:
    """Refuse a Redis without LMOVE and BLMOVE (older than 6.2): the reliable pop needs them."""
    info = client.execute_command("INFO", "server")
    if isinstance(info, bytes | str):
        text = _text(info)
        info = dict(ln.split(":", 1) for ln in text.splitlines() if ":" in ln)
    version = str(info.get("redis_version", "0"))
    parts = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    if parts < MIN_REDIS:
        raise ConfigurationError(
            f"broker_url: Redis {version} has no LMOVE/BLMOVE, which workerkit's Celery engine "
            "needs (its reliable pop): use Redis 6.2 or newer"
        )


def recover_in_flight(client: Any, prefix: str, ttl: float) -> int:
    """:func:`recover_abandoned`, which never raises: its failure (Redis refusing a script, a
    lost connection) is logged and must not stop the lease-based recovery after it."""
    try:
        return recover_abandoned(client, prefix, forget_after=ttl * FORGET_AFTER_TTLS)
    except Exception as exc:
        log.warning(
            "could not recover the in-flight lists of dead workers; tried again next round",
            extra={"event": "pop_recovery_failed", "error": str(exc)},
        )
        return 0


def recover_abandoned(client: Any, prefix: str = "", forget_after: float = 300.0) -> int:
    """Crash recovery: the in-flight lists of workers whose liveness key is gone go back to
    their queues (pop_return.lua re-checks the key); they stay registered until the worker
    has been gone ``forget_after`` seconds. How many entries moved."""
    registry = prefix + REGISTRY
    lists: dict[str, list[str]] = {}
    for key, value in (client.execute_command("HGETALL", registry) or {}).items():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            record = json.loads(_text(value))
            lists.setdefault(str(record["owner"]), []).extend([_text(key), str(record["queue"])])
    owners = list(lists)
    if not owners:
        return 0
    pipe = client.pipeline(transaction=False)
    for owner in owners:
        pipe.execute_command("EXISTS", prefix + ALIVE_PREFIX + owner)
    moved = 0
    for owner, alive in zip(owners, pipe.execute(), strict=True):
        if alive:
            continue
        keys = [registry, prefix + ALIVE_PREFIX + owner, prefix + GONE, *lists[owner]]
        args = ["dead", owner, int(forget_after * 1000)]
        n = int(client.execute_command("EVAL", _RETURN, len(keys), *keys, *args) or 0)
        if n:
            log.warning(
                "messages popped by a worker that died are back in their queues",
                extra={"event": "pop_recovered", "owner": owner, "messages": n},
            )
        moved += n
    return moved
