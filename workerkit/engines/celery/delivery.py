"""kombu's deliveries under workerkit: each takes its lease with its ``unacked`` entry, and a
channel that closes (a lost connection, a consumer restart) restores none of them behind the
leases' back. Also the prefork pool's children, found through Celery's consumer.
"""

from __future__ import annotations

import time
from typing import Any

from workerkit.engines.celery.ledger import Ledger

__all__ = ("lease_at_delivery", "pool_pids")


def pool_pids(consumer: Any) -> list[int]:
    """The pids of the prefork pool's children (none for the solo and threads pools)."""
    pool = getattr(getattr(consumer, "pool", None), "_pool", None)
    processes = getattr(pool, "_pool", None) or []
    return [int(p.pid) for p in processes if getattr(p, "pid", None)]


def lease_at_delivery(qos: Any, owner: str, ttl: float) -> None:
    """Make kombu's Redis QoS write a message's lease with its ``unacked`` entry.

    kombu's ``QoS.append`` (kombu 5.x), with one more command in its pipeline: the lease key,
    ``owner``'s for ``ttl`` s. So every delivery holds its lease from the instant it is in
    ``unacked``, and a lease that is gone means that no worker holds that delivery: the fences
    of the ack, the restore and the renewal (ledger.py) compare the holder exactly.
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
        with qos.pipe_or_acquire() as pipe:
            pipe.zadd(qos.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(qos.unacked_key, delivery_tag, raw)
            pipe.set(Ledger.key("lease", str(delivery_tag)), owner, px=milliseconds)
            pipe.execute()
            remember(qos, message, delivery_tag)

    qos.append = append
    # kombu restores every delivery of a channel as it closes (a lost connection, a restart of
    # the consumer), unfenced: a task still running here would run again on another worker.
    # A message stays in ``unacked`` under its lease instead: settled by its run, handed back
    # by the runtime, or restored by crash recovery once the lease is gone.
    qos.restore_at_shutdown = False
    qos._workerkit_owner = owner
