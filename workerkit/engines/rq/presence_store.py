"""Worker presences and queue pauses in the RQ engine's Redis (what the dashboard reads).

A presence is ``workerkit:presence:<worker id>`` (the JSON, expiring after an hour, so a worker
gone without a word stays visible as lost for that long) plus its member in the sorted set
``workerkit:presence`` scored by its heartbeat, pruned past an hour. ``heartbeat_at`` is Redis's
clock (``TIME``). A paused queue is a field of the hash ``workerkit:paused`` (JSON ``{at,
actor}``); workers read its field names through :class:`~workerkit.engines.presence.PausedQueues`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.presence import Presence

if TYPE_CHECKING:
    import redis

__all__ = (
    "PAUSED_KEY",
    "PRESENCE_KEEP",
    "PRESENCE_KEY",
    "PRESENCE_PREFIX",
    "RedisPresenceStore",
    "redis_time",
)

log = logging.getLogger("workerkit.engines.rq")

PRESENCE_PREFIX: Final = "workerkit:presence:"
PRESENCE_KEY: Final = "workerkit:presence"
PAUSED_KEY: Final = "workerkit:paused"
#: How long a presence is kept after its last heartbeat (shown as lost once past its own ttl).
PRESENCE_KEEP: Final = 3600


def redis_time(connection: redis.Redis[Any]) -> float:
    """Redis's clock now, in epoch seconds."""
    seconds, micros = connection.time()
    return int(seconds) + int(micros) / 1_000_000


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisPresenceStore:
    """:class:`~workerkit.engines.presence.PresenceStore` and ``QueuePauseStore`` on Redis."""

    def __init__(self, connection: redis.Redis[Any], *, owns_connection: bool = False) -> None:
        self.connection = connection
        self._owns_connection = owns_connection

    # --- presences --------------------------------------------------------------------------

    def publish(self, presence: Presence) -> None:
        """Write ``presence`` with Redis's clock as its heartbeat; prune presences past an hour."""
        now = redis_time(self.connection)
        stamped = dataclasses.replace(presence, heartbeat_at=now)
        with self.connection.pipeline(transaction=True) as pipeline:
            pipeline.set(PRESENCE_PREFIX + presence.worker_id, stamped.to_json(), ex=PRESENCE_KEEP)
            pipeline.zadd(PRESENCE_KEY, {presence.worker_id: now})
            pipeline.zremrangebyscore(PRESENCE_KEY, "-inf", f"({now - PRESENCE_KEEP}")
            pipeline.execute()

    def remove(self, worker_id: str) -> None:
        with self.connection.pipeline(transaction=True) as pipeline:
            pipeline.delete(PRESENCE_PREFIX + worker_id)
            pipeline.zrem(PRESENCE_KEY, worker_id)
            pipeline.execute()

    def list_all(self) -> list[Presence]:
        """Every presence kept (lost ones included), most recent heartbeat first."""
        ids = [_text(raw) for raw in self.connection.zrevrange(PRESENCE_KEY, 0, -1)]
        if not ids:
            return []
        records = self.connection.mget([PRESENCE_PREFIX + worker_id for worker_id in ids])
        found: list[Presence] = []
        for worker_id, raw in zip(ids, records, strict=True):
            if raw is None:
                continue  # expired; its member goes with the next prune
            try:
                found.append(Presence.from_json(raw))
            except (ValueError, TypeError) as exc:
                log.warning(
                    "unreadable presence record skipped",
                    extra={
                        "event": "presence_unreadable",
                        "worker_id": worker_id,
                        "error": str(exc),
                    },
                )
        return found

    # --- queue pauses -----------------------------------------------------------------------

    def paused_queues(self) -> frozenset[str]:
        return frozenset(_text(name) for name in self.connection.hkeys(PAUSED_KEY))

    def pause_record(self, queue: str) -> dict[str, Any] | None:
        """``{"at", "actor"}`` of a paused queue, None when it is not paused."""
        raw = self.connection.hget(PAUSED_KEY, queue)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return {"at": None, "actor": _text(raw)}
        return record if isinstance(record, dict) else {"at": None, "actor": str(record)}

    def set_queue_paused(self, queue: str, paused: bool, actor: str) -> bool:
        """Pause or resume ``queue``; True when that changed something."""
        if not paused:
            return bool(self.connection.hdel(PAUSED_KEY, queue))
        record = json.dumps({"at": redis_time(self.connection), "actor": actor})
        return bool(self.connection.hsetnx(PAUSED_KEY, queue, record))

    def close(self) -> None:
        if self._owns_connection:
            self.connection.close()
