"""The rq engine's outage scripts on a real redis-server: a popped job id pushed back only when
nobody has it, and a settle retried after an outage fenced by the lease token.

The outages themselves (Redis restarted, connections killed, under three pods) are in
tests/faults/test_rq_faults.py; the retry logic's own bounds in tests/unit/test_rq_outage.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rq import Queue
from rq.serializers import JSONSerializer

from workerkit.engines.rq.leases import AttemptKeys, Leases, lease_key, started_key
from workerkit.engines.rq.perform import SETTLE_AGAIN

if TYPE_CHECKING:
    import redis


def enqueued(client: redis.Redis[bytes], job_id: str) -> Queue:
    queue = Queue("default", connection=client, serializer=JSONSerializer)
    queue.enqueue("tests.apps.fault_jobs.rq_short", job_id, 0.0, job_id=job_id)
    return queue


def test_a_popped_id_goes_back_to_the_front_only_when_nobody_has_it(
    redis_client: redis.Redis[bytes],
) -> None:
    leases = Leases(redis_client, lease_ttl=4.0)
    enqueued(redis_client, "a")
    enqueued(redis_client, "b")
    assert redis_client.lpop("rq:queue:default") == b"a"  # popped, then Redis went away
    assert leases.push_back("default", "a")
    assert redis_client.lrange("rq:queue:default", 0, -1) == [b"a", b"b"]

    # Redis restarted from an append-only file written before the pop: the id is there again.
    assert not leases.push_back("default", "a")
    assert redis_client.lrange("rq:queue:default", 0, -1) == [b"a", b"b"]

    # Started by an attempt (its lease), or not queued any more: someone has it.
    assert redis_client.lpop("rq:queue:default") == b"a"
    redis_client.set(lease_key("a"), "run:token")
    assert not leases.push_back("default", "a")
    redis_client.delete(lease_key("a"))
    redis_client.hset("rq:job:a", "status", "finished")
    assert not leases.push_back("default", "a")
    assert redis_client.lrange("rq:queue:default", 0, -1) == [b"b"]


def test_a_retried_settle_takes_an_expired_lease_back_only_while_nobody_took_the_job(
    redis_client: redis.Redis[bytes],
) -> None:
    leases = Leases(redis_client, lease_ttl=4.0)
    keys = AttemptKeys("j", "token", "default")
    redis_client.zadd(started_key("default"), {keys.member: 1.0})

    # The lease expired while Redis was down; the attempt is still a started member.
    assert leases.transition(keys, SETTLE_AGAIN, "settle", 60_000)
    assert redis_client.get(lease_key("j")) == b"settle:token"
    # The first try landed and its reply was lost: its own settle is accepted again.
    assert leases.transition(keys, SETTLE_AGAIN, "settle", 60_000)

    # Another attempt owns the job, or a recovering worker took this one over: fenced.
    redis_client.set(lease_key("j"), "run:other")
    assert not leases.transition(keys, SETTLE_AGAIN, "settle", 60_000)
    redis_client.set(lease_key("j"), "recover:token")
    assert not leases.transition(keys, SETTLE_AGAIN, "settle", 60_000)

    # Requeued by crash recovery (the member is gone): fenced, even with no lease at all.
    redis_client.delete(lease_key("j"))
    redis_client.zrem(started_key("default"), keys.member)
    assert not leases.transition(keys, SETTLE_AGAIN, "settle", 60_000)
    assert redis_client.get(lease_key("j")) is None
