"""workerkit's keys in the broker's Redis: leases, checkpoints and their fences, restores.

Every restore rewrites the message in the transaction that moves it (GEN_HEADER, and
CRASHES_HEADER when its worker died), so a run learns its attempt and fencing generation from
``task.request`` without a Redis round trip. docs/engines/celery.md has the whole design.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

from workerkit.engines.celery.outage import retrying
from workerkit.errors import LeaseLost

__all__ = (
    "CRASHES_HEADER",
    "GEN_HEADER",
    "KEY_PREFIX",
    "KEY_RETENTION",
    "RENEW_RETRY",
    "Generation",
    "Ledger",
    "count",
)

log = logging.getLogger("workerkit.engines.celery")

#: Every key workerkit keeps in the broker's Redis starts with this.
KEY_PREFIX: Final = "workerkit:celery:"
#: Keys of finished work (attempts, checkpoints) expire after this, whatever happens.
KEY_RETENTION: Final = 7 * 24 * 3600
#: How long a lease renewal that meets a broken connection is retried (the keeper's next round
#: comes W/6 later; a killed connection reconnects at the next try).
RENEW_RETRY: Final = 0.3
#: (Celery's retries, workerkit's restores, start time in ms): the order of fence.lua.
Generation = tuple[int, int, int]

#: Message headers workerkit adds when it puts a message back in its queue (every restore is
#: a read-modify-write of the payload in kombu's ``unacked`` hash, inside the restore's
#: transaction). Celery copies every message header into ``task.request``.
GEN_HEADER: Final = "workerkit_gen"  # +1 at every workerkit restore
CRASHES_HEADER: Final = "workerkit_crashes"  # +1 when the run's worker died


def _script(name: str) -> str:
    """A checkpoint script with the fence functions (fence.lua) before it."""
    here = resources.files("workerkit.engines.celery")
    return here.joinpath("fence.lua").read_text() + here.joinpath(name).read_text()


# Checkpoints are fenced by the attempt's generation: the fence key holds the highest
# generation that touched the checkpoint, and an attempt whose generation is lower is stale.
# Ordering (rather than "the last attempt to start wins", which needs a write at every start)
# lets the fence be taken lazily, at the first read or write of the checkpoint. Retries and
# restores order attempts exactly; the start time only orders two runs of one delivery (a
# restore that is not workerkit's, e.g. kombu's own after the visibility timeout).
_CLAIM_CHECKPOINT: Final = _script("claim_checkpoint.lua")
_SAVE_CHECKPOINT: Final = _script("save_checkpoint.lua")
_FINISH: Final = _script("finish.lua")


def _plain(name: str) -> str:
    return resources.files("workerkit.engines.celery").joinpath(name).read_text()


def count(value: Any) -> int:
    """A header's or a setting's count: a non-negative int, 0 when missing or malformed."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


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
        # kombu's ``global_keyprefix``: its client adds it to the key of the commands it knows
        # (SET, HGET, DEL, WATCH, ...) and to the first key of an EVALSHA only; we add it to
        # the others, so that every command reaches the key kombu's own commands use.
        self._prefix = str(getattr(self.channel, "global_keyprefix", "") or "")
        self._indices = (self.unacked_key, self.unacked_index_key)
        self._claim = self.client.register_script(_CLAIM_CHECKPOINT)
        self._save = self.client.register_script(_SAVE_CHECKPOINT)
        self._finish = self.client.register_script(_FINISH)
        self._renew = self.client.register_script(_plain("renew.lua"))
        self._ack = self.client.register_script(_plain("ack.lua"))

    @property
    def prefix(self) -> str:
        """kombu's ``global_keyprefix`` ("" without one)."""
        return self._prefix

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
        fresh, raw = self._claim(keys=self._keys(task_id), args=[*generation, KEY_RETENTION])
        return bool(fresh), (json.loads(raw) if raw is not None else None)

    def save_checkpoint(self, task_id: str, generation: Generation, state: Any) -> None:
        data = json.dumps(state, separators=(",", ":"))
        args = [*generation, KEY_RETENTION, data]
        if not self._save(keys=self._keys(task_id), args=args):
            raise LeaseLost(f"task {task_id}: a newer attempt owns it; checkpoint not saved")

    def finish(self, task_id: str, generation: Generation) -> None:
        """The task completed: its checkpoint and fence go (unless a newer attempt has them)."""
        self._finish(keys=self._keys(task_id), args=[*generation, KEY_RETENTION])

    # --- leases and restores --------------------------------------------------------------

    def renew_leases(self, tags: Sequence[str], owner: str, ttl: float) -> list[str]:
        """Renew ``owner``'s leases on ``tags``, fenced (renew.lua): the tags that are lost.

        A lease is lost once its message left ``unacked`` (acknowledged, or restored by a
        worker that saw the lease expire) or another worker's delivery of it holds the lease.
        """
        if not tags:
            return []
        keys = [self.unacked_key, *(self._prefix + self.key("lease", tag) for tag in tags)]
        args = [owner, max(1, int(ttl * 1000)), *tags]
        # A killed connection reconnects at the next try: retried at once, for a moment only
        # (the caller measured the lease from before this call, so a late landing is safe).
        deadline = time.monotonic() + RENEW_RETRY
        lost = retrying(
            "lease renewal",
            "",
            lambda: self._renew(keys=keys, args=args),
            keep_trying=lambda: time.monotonic() < deadline,
            quiet=True,  # the keeper reports a failed round (keeper_failed)
        )
        return [t.decode() if isinstance(t, bytes) else str(t) for t in lost or ()]

    def ack(self, tag: str, owner: str) -> bool:
        """kombu's ack of ``tag``, fenced (ack.lua): False, and nothing removed, when another
        worker holds the message's lease (it was restored and delivered again meanwhile)."""
        keys = [self.key("lease", tag), *(self._prefix + k for k in self._indices)]
        return bool(self._ack(keys=keys, args=[owner, tag]))

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
            holder = pipe.get(self._prefix + lease_key)
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
            headers[GEN_HEADER] = count(headers.get(GEN_HEADER)) + 1
            if crashed:
                headers[CRASHES_HEADER] = count(headers.get(CRASHES_HEADER)) + 1
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
            # kombu publishes with LPUSH and pops from the right (pop.py too), so the head of a
            # queue is its right end (RPUSH; kombu's visibility-timeout restore does that too)
            # and a reject puts a message at the back (LPUSH).
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

    def unblock(self, client_id: int) -> bool:
        """Unblock the pop the Redis client ``client_id`` waits in (CLIENT UNBLOCK): it
        returns empty, nothing popped. False when that client is not blocked."""
        return bool(self.client.client_unblock(client_id))

    def abandoned(self, older_than: float, limit: int = 100) -> list[str]:
        """Tags delivered before ``older_than`` (epoch seconds) whose lease key is gone."""
        tags = self.client.zrangebyscore(
            self._prefix + self.unacked_index_key, "-inf", older_than, start=0, num=limit
        )
        if not tags:
            return []
        names = [t.decode() if isinstance(t, bytes) else str(t) for t in tags]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.exists(self._prefix + self.key("lease", name))
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
