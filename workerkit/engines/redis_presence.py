"""Worker presences and queue pauses in Redis, for the Redis engines (Celery and RQ).

Keys (docs/engines/celery.md, "Dashboard"): ``workerkit:presence:<worker id>`` holds a
presence's JSON for an hour (a lost worker stays visible as lost), the sorted set
``workerkit:presence`` lists the ids by heartbeat (pruned after an hour), and the hash
``workerkit:paused`` maps a paused queue to ``{"at", "actor"}``. Heartbeats are Redis's TIME.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

from workerkit.engines.presence import Presence

if TYPE_CHECKING:
    from workerkit.engines.presence import PresenceStore, QueuePauseStore

__all__ = (
    "PAUSED_KEY",
    "PRESENCE_KEEP",
    "PRESENCE_KEY",
    "RedisPresenceStore",
    "redis_time",
)

#: The sorted set of worker ids by heartbeat; each id's record is this plus ``:<id>``.
PRESENCE_KEY: Final = "workerkit:presence"
#: The pause set: a hash, queue -> ``{"at": epoch seconds, "actor": name}``.
PAUSED_KEY: Final = "workerkit:paused"
#: How long a presence is kept after its last heartbeat (the record's TTL, the set's pruning).
PRESENCE_KEEP: Final = 3600

# KEYS: the record, the set. ARGV: the presence JSON, the worker id, the keep (s).
# The heartbeat is the server's clock (written into Presence.to_json's compact JSON); the set
# forgets ids older than the keep.
_PUBLISH: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local stamp = string.format('"heartbeat_at":%.6f', now)
local record = string.gsub(ARGV[1], '"heartbeat_at":[^,}]*', stamp, 1)
redis.call('SET', KEYS[1], record, 'EX', tonumber(ARGV[3]))
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
return tostring(now)
"""

# KEYS: the pause hash. ARGV: the queue, the actor. 1 when it was not paused yet.
_PAUSE: Final = """
local t = redis.call('TIME')
local at = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('HSETNX', KEYS[1], ARGV[1], cjson.encode({at = at, actor = ARGV[2]}))
"""


def redis_time(client: Any) -> float:
    """Redis's clock now, in epoch seconds."""
    seconds, micros = client.time()
    return int(seconds) + int(micros) / 1_000_000


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisPresenceStore:
    """:class:`~workerkit.engines.presence.PresenceStore` and ``QueuePauseStore`` on Redis.

    ``client``: a redis-py client (``decode_responses`` either way); ``prefix`` goes in front of
    every key (kombu's ``global_keyprefix`` for the Celery engine, "" for RQ).
    """

    def __init__(self, client: Any, prefix: str = "", *, owns_client: bool = False) -> None:
        self.client = client
        self.prefix = prefix
        self._owns_client = owns_client
        self.set_key = prefix + PRESENCE_KEY
        self.paused_key = prefix + PAUSED_KEY

    def record_key(self, worker_id: str) -> str:
        return f"{self.set_key}:{worker_id}"

    # --- presences ----------------------------------------------------------------------

    def publish(self, presence: Presence) -> None:
        keys = [self.record_key(presence.worker_id), self.set_key]
        args = [presence.to_json(), presence.worker_id, PRESENCE_KEEP]
        self.client.execute_command("EVAL", _PUBLISH, len(keys), *keys, *args)

    def remove(self, worker_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.execute_command("DEL", self.record_key(worker_id))
        pipe.execute_command("ZREM", self.set_key, worker_id)
        pipe.execute()

    def list_all(self) -> list[Presence]:
        """Every presence kept, newest heartbeat first (a record gone with its TTL is left out)."""
        ids = [_text(i) for i in self.client.execute_command("ZREVRANGE", self.set_key, 0, -1)]
        if not ids:
            return []
        raws = self.client.execute_command("MGET", *(self.record_key(i) for i in ids))
        found: list[Presence] = []
        for raw in raws:
            if raw is None:
                continue
            try:
                found.append(Presence.from_json(raw))
            except (ValueError, TypeError):
                continue  # not a record this version reads; it expires with its TTL
        return found

    # --- pauses ---------------------------------------------------------------------------

    def paused_queues(self) -> frozenset[str]:
        return frozenset(_text(q) for q in self.client.execute_command("HKEYS", self.paused_key))

    def pauses(self) -> dict[str, dict[str, Any]]:
        """Each paused queue's ``{"at", "actor"}``."""
        found: dict[str, dict[str, Any]] = {}
        for queue, raw in (self.client.execute_command("HGETALL", self.paused_key) or {}).items():
            try:
                value = json.loads(_text(raw))
            except ValueError:
                value = {}
            found[_text(queue)] = value if isinstance(value, dict) else {}
        return found

    def pause_record(self, queue: str) -> dict[str, Any] | None:
        """``{"at", "actor"}`` of a paused queue, None when it is not paused."""
        return self.pauses().get(queue)

    def set_queue_paused(self, queue: str, paused: bool, actor: str) -> bool:
        if paused:
            reply = self.client.execute_command("EVAL", _PAUSE, 1, self.paused_key, queue, actor)
        else:
            reply = self.client.execute_command("HDEL", self.paused_key, queue)
        return bool(int(reply or 0))

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


if TYPE_CHECKING:  # mypy checks that the store is both of the contract's stores

    def _presences(store: RedisPresenceStore) -> PresenceStore:
        return store

    def _pauses(store: RedisPresenceStore) -> QueuePauseStore:
        return store
