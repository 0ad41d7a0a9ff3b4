"""kombu's deliveries under workerkit: each takes its lease with its ``unacked`` entry, and a
channel that closes (a lost connection, a consumer restart) restores none of them behind the
leases' back; the consumer's pop connection (pop.py) knows its Redis client id, and a release
first unblocks its waiting pop (:func:`seal`). Also the prefork pool's children, found through
Celery's consumer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from workerkit.engines.celery.ledger import Ledger
from workerkit.engines.celery.outage import retrying
from workerkit.engines.celery.pop import InFlight, Reclaimed

__all__ = (
    "client_id_of",
    "in_pool",
    "keep_written_jobs",
    "lease_at_delivery",
    "pool_pids",
    "remember_client_ids",
    "seal",
)

log = logging.getLogger("workerkit.engines.celery")

#: How often a seal looks whether the consumer's pop has returned.
TICK: Final = 0.005
#: How long a delivery's ``unacked`` and lease write is retried after a broken connection.
DELIVERY_RETRY: Final = 0.5


def remember_client_ids(channel: Any) -> None:
    """Before each pop (pop.py) on a connection new to it, ask Redis for that connection's client
    id (CLIENT ID: one round trip per connection), so that a release can unblock exactly that
    pop (:func:`client_id_of`), whatever address Redis sees (SNAT, a proxy, a unix socket)."""
    if getattr(channel, "_workerkit_client_ids", False):
        return
    from redis.exceptions import ResponseError

    start = channel._brpop_start

    def brpop_start(timeout: Any = None) -> Any:
        connection: Any = getattr(channel.client, "connection", None)
        sock = getattr(connection, "_sock", None)
        if sock is not None and getattr(connection, "_workerkit_sock", None) is not sock:
            connection._workerkit_client_id = None
            connection.send_command("CLIENT", "ID")
            with contextlib.suppress(ResponseError):  # a server without CLIENT ID
                connection._workerkit_client_id = int(connection.read_response())
            connection._workerkit_sock = sock
        return start(timeout)

    channel._brpop_start = brpop_start
    channel._workerkit_client_ids = True


def client_id_of(connection: Any) -> int | None:
    """The Redis client id of ``connection``'s current socket, if :func:`remember_client_ids`
    learned it (None: unknown, or the connection reconnected since)."""
    sock = getattr(connection, "_sock", None)
    if sock is None or getattr(connection, "_workerkit_sock", None) is not sock:
        return None
    value = getattr(connection, "_workerkit_client_id", None)
    return int(value) if value is not None else None


def seal(consumer: Any, ledger: Ledger, stop_consuming: Callable[[], None], within: float) -> bool:
    """Before a release: make sure no message can reach this process any more.

    kombu's consumer keeps a pop waiting (a BLMOVE, pop.py) whenever it has a free prefetch
    slot, and Redis hands the next message pushed to the queue to that pop: the very messages
    the release puts back (or the requeue of a killed pool child's message). Popped into a
    process about to exit, such a message would wait in its in-flight list for crash recovery.
    So the consumer is cancelled on its loop thread (``stop_consuming``: no new pop), the
    waiting one is unblocked in Redis by its client id (CLIENT UNBLOCK: it returns empty,
    nothing popped), and a reply already sent is left for the loop to read (a message that
    reached us is then in ``unacked``, and in hand). Bounded by ``within``. False when a pop
    may still be waiting (its client id unknown, the unblock failed): then nothing may be put
    back, and crash recovery restores the messages once their leases expire.
    """
    hub = getattr(getattr(consumer, "controller", None), "hub", None)
    channel = getattr(getattr(consumer, "task_consumer", None), "channel", None)
    if hub is None or channel is None:
        return True  # no event loop: no pop of the consumer's waits meanwhile
    deadline = time.monotonic() + within
    cancelled = threading.Event()

    def cancel() -> None:
        try:
            stop_consuming()
        finally:
            cancelled.set()

    hub.call_soon(cancel)
    cancelled.wait(within)  # a busy loop sends no new pop either
    waiting = getattr(channel, "_in_poll", None)
    if not waiting:
        return True
    client_id = client_id_of(waiting)
    unblocked = False
    try:
        unblocked = client_id is not None and ledger.unblock(client_id)
    except Exception as exc:
        log.warning(
            "cannot unblock the consumer's pop",
            extra={"event": "unblock_failed", "error": str(exc)},
        )
    while getattr(channel, "_in_poll", None) is waiting and time.monotonic() < deadline:
        time.sleep(TICK)
    # Not unblocked by us: sealed only if its reply came (the loop read it).
    return unblocked or getattr(channel, "_in_poll", None) is not waiting


def keep_written_jobs(pool: Any) -> None:
    """Celery's flush of the prefork pool at a lost connection drops from the pool's cache
    every job no child has acknowledged yet, also one written to a child's pipe already: the
    child runs it anyway, and its result, found in no cache, is dropped (never settled). Those
    are put back (wrapped once per flush: a restarted pool gets a new one): their acceptance and
    result reach their Request as usual."""
    flush = getattr(pool, "flush", None)
    cache = getattr(getattr(pool, "_pool", None), "_cache", None)
    if flush is None or cache is None or getattr(flush, "_workerkit_keeps", False):
        return

    def flush_keeping_written() -> None:
        written = {
            key: job
            for key, job in list(cache.items())
            if not job._accepted and getattr(job, "_write_to", None) is not None
        }
        try:
            flush()
        finally:
            for key, job in written.items():
                if key not in cache and job._write_to._is_alive():
                    cache[key] = job

    flush_keeping_written._workerkit_keeps = True  # type: ignore[attr-defined]
    pool.flush = flush_keeping_written


def in_pool(consumer: Any, request: Any) -> bool:
    """Whether the prefork pool still has ``request``'s job (written to a child, or running)."""
    cache = getattr(getattr(getattr(consumer, "pool", None), "_pool", None), "_cache", None)
    ref = getattr(request, "_apply_result", None)
    job = ref() if callable(ref) else None
    return cache is not None and job is not None and cache.get(job._job) is job


def pool_pids(consumer: Any) -> list[int]:
    """The pids of the prefork pool's children (none for the solo and threads pools)."""
    pool = getattr(getattr(consumer, "pool", None), "_pool", None)
    processes = getattr(pool, "_pool", None) or []
    return [int(p.pid) for p in processes if getattr(p, "pid", None)]


def lease_at_delivery(qos: Any, owner: str, ttl: float, flight: InFlight | None = None) -> None:
    """Make kombu's Redis QoS write a message's lease with its ``unacked`` entry.

    kombu's ``QoS.append`` (kombu 5.x), with one more command in its pipeline: the lease key,
    ``owner``'s for ``ttl`` s. So every delivery holds its lease from the instant it is in
    ``unacked``, and a lease that is gone means that no worker holds that delivery: the fences
    of the ack, the restore and the renewal (ledger.py) compare the holder exactly. A message
    the reliable pop (pop.py, ``flight``) popped leaves its in-flight list in the same step;
    when it is no longer there (put back in its queue meanwhile), nothing is written and the
    delivery is called off (:class:`~workerkit.engines.celery.pop.Reclaimed`).
    """
    if getattr(qos, "_workerkit_owner", None) == owner:
        return
    from kombu.transport.virtual import QoS as VirtualQoS
    from kombu.utils.json import dumps

    remember: Any = VirtualQoS.append  # kombu's in-memory bookkeeping of the delivery
    encode: Any = dumps

    milliseconds = max(1, int(ttl * 1000))

    def append(message: Any, delivery_tag: Any) -> None:
        delivery = message.delivery_info
        raw = encode([message._raw, delivery["exchange"], delivery["routing_key"]])

        channel: Any = getattr(qos, "channel", None)
        popped = getattr(channel, "_workerkit_popped", None)
        if popped is not None and flight is not None:
            channel._workerkit_popped = None  # taken: the pop sees its delivery written

        def write() -> bool:
            if popped is not None and flight is not None:
                return flight.deliver(qos, popped, str(delivery_tag), raw)
            with qos.pipe_or_acquire() as pipe:
                pipe.zadd(qos.unacked_index_key, {delivery_tag: time.time()})
                pipe.hset(qos.unacked_key, delivery_tag, raw)
                pipe.set(Ledger.key("lease", str(delivery_tag)), owner, px=milliseconds)
                pipe.execute()
            return True

        # The message is popped already: a connection killed under this write (the pool's
        # connection checked out just before a kill) must not lose it. A retry reconnects.
        deadline = time.monotonic() + DELIVERY_RETRY
        headers = getattr(message, "headers", None) or {}
        job_id = str(headers.get("id") or delivery_tag)
        if not retrying("delivery", job_id, write, keep_trying=lambda: time.monotonic() < deadline):
            raise Reclaimed(job_id)
        remember(qos, message, delivery_tag)

    qos.append = append
    # kombu restores every delivery of a channel as it closes (a lost connection, a restart of
    # the consumer), unfenced: a task still running here would run again on another worker.
    # A message stays in ``unacked`` under its lease instead: settled by its run, handed back
    # by the runtime, or restored by crash recovery once the lease is gone.
    qos.restore_at_shutdown = False
    qos._workerkit_owner = owner
