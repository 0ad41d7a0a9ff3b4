"""The Celery consumer's reliable pop (engines/celery/pop.py) on a real kombu channel and Redis:
a pop is a move into the worker's in-flight list, the delivery takes it out, and what a lost
reply left there goes back to its queue once, at a new connection or by crash recovery."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery

from tests.support.harness import wait_until
from workerkit.engines.celery import configure_app
from workerkit.engines.celery.delivery import lease_at_delivery
from workerkit.engines.celery.pop import InFlight, recover_abandoned, reliable_pop
from workerkit.settings import Settings


class Consumer:
    """One kombu channel consuming ``celery`` through the reliable pop, without a worker."""

    def __init__(self, url: str, prefix: str, owner: str = "w1") -> None:
        self.app = Celery("t", broker=url)
        if prefix:
            self.app.conf.broker_transport_options = {"global_keyprefix": prefix}
        configure_app(self.app, Settings(engine="celery", redis_url=url))
        self.prefix = prefix
        self.connection = self.app.connection_for_write()
        self.channel: Any = self.connection.default_channel
        self.got: list[str] = []
        self.dead: list[tuple[str, str]] = []
        self.channel.basic_consume(
            "celery", False, lambda m: self.got.append(m.headers["id"]), "t1"
        )
        self.flight = InFlight(owner, 30.0, prefix)
        lease_at_delivery(self.channel.qos, owner, 30.0, self.flight)
        reliable_pop(self.channel, self.flight, self._dead_letter)
        self.connect()

    def _dead_letter(self, queue: str, raw: bytes, reason: str, taken_from: str = "") -> None:
        self.dead.append((queue, reason))
        self.flight.refuse(self.client(), taken_from, raw, "dead:" + queue, reason)

    def client(self) -> Any:
        return self.channel.client

    def connect(self) -> None:
        client = self.channel.client
        client.connection = client.connection_pool.get_connection()
        client.connection.connect()

    def pop(self) -> bool:
        self.channel._brpop_start()
        try:
            return bool(self.channel._brpop_read())
        except Empty:
            return False

    def close(self) -> None:
        self.connection.release()


@pytest.fixture(params=["", "wk:"], ids=["plain", "keyprefix"])
def consumer(request: Any, redis_url: str) -> Iterator[Consumer]:
    made = Consumer(redis_url, request.param)
    yield made
    made.close()


def _send(consumer: Consumer, task_id: str) -> None:
    consumer.app.send_task("noop", args=[], task_id=task_id, queue="celery")


def _in_flight(redis_client: Any) -> list[str]:
    ids = []
    for key in redis_client.scan_iter("*workerkit:celery:inflight:*"):
        ids += [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(key, 0, -1)]
    return ids


def _queued(redis_client: Any, prefix: str, queue: str = "celery") -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(prefix + queue, 0, -1)]


def _blocked(redis_client: Any) -> None:
    """Wait until Redis holds a blocking command (the consumer's BLMOVE) waiting."""
    wait_until(
        lambda: int(redis_client.info("clients")["blocked_clients"]) >= 1,
        timeout=10,
        what="the BLMOVE to wait in Redis",
    )


def _until_in_flight(redis_client: Any, ids: list[str]) -> None:
    wait_until(lambda: sorted(_in_flight(redis_client)) == ids, timeout=10, what=f"{ids} in flight")


def test_a_pop_moves_the_message_and_its_delivery_takes_it_out(
    consumer: Consumer, redis_client: Any
) -> None:
    _send(consumer, "a")
    assert consumer.pop()
    assert consumer.got == ["a"]
    assert _in_flight(redis_client) == []
    assert _queued(redis_client, consumer.prefix) == []
    assert redis_client.hlen(consumer.prefix + "unacked") == 1
    tag = next(iter(redis_client.hkeys(consumer.prefix + "unacked"))).decode()
    assert redis_client.get(f"{consumer.prefix}workerkit:celery:lease:{tag}") == b"w1"
    assert not consumer.pop()  # empty: the next pop blocks (1 s at most), nothing popped


def test_a_lost_reply_goes_back_at_the_next_connection_and_is_delivered_once(
    consumer: Consumer, redis_client: Any
) -> None:
    _send(consumer, "first")
    _send(consumer, "second")
    consumer.channel._brpop_start()  # Redis pops "first"...
    _until_in_flight(redis_client, ["first"])
    consumer.channel.client.connection.disconnect()  # ...and its reply is lost
    assert _in_flight(redis_client) == ["first"]
    assert _queued(redis_client, consumer.prefix) == ["second"]
    consumer.connect()
    assert consumer.pop()  # back at the head of the queue first, then popped again
    assert consumer.pop()
    assert consumer.got == ["first", "second"]
    assert _in_flight(redis_client) == []
    assert redis_client.hlen(consumer.prefix + "unacked") == 2


def test_a_dead_workers_popped_message_is_recovered_once_and_never_delivered_by_it(
    consumer: Consumer, redis_client: Any
) -> None:
    _send(consumer, "orphan")
    consumer.channel._brpop_start()  # popped; the reply waits unread on the socket
    _until_in_flight(redis_client, ["orphan"])
    alive = consumer.prefix + "workerkit:celery:alive:w1"
    assert recover_abandoned(redis_client, consumer.prefix) == 0  # its worker is alive
    redis_client.delete(alive)  # its liveness expired (a stopped worker)
    assert recover_abandoned(redis_client, consumer.prefix) == 1
    assert recover_abandoned(redis_client, consumer.prefix) == 0  # once
    assert _queued(redis_client, consumer.prefix) == ["orphan"]
    assert _in_flight(redis_client) == []
    # The worker wakes and reads its reply: the entry is no longer in flight, not delivered.
    with pytest.raises(Empty):
        consumer.channel._brpop_read()
    assert consumer.got == []
    assert redis_client.hlen(consumer.prefix + "unacked") == 0
    assert consumer.pop()  # it runs from its queue, once
    assert consumer.got == ["orphan"]


def test_an_entry_kombu_cannot_read_leaves_its_in_flight_list_for_the_dead_letters(
    consumer: Consumer, redis_client: Any
) -> None:
    redis_client.lpush(consumer.prefix + "celery", b"\xff not a message")
    assert not consumer.pop()
    assert consumer.dead == [("celery", consumer.dead[0][1])]
    assert _in_flight(redis_client) == []
    assert _queued(redis_client, consumer.prefix) == []
    assert redis_client.lrange(consumer.prefix + "dead:celery", 0, -1) == [
        consumer.dead[0][1].encode()
    ]


def test_an_idle_pop_blocks_on_the_main_key_and_sees_the_other_keys_within_a_second(
    consumer: Consumer, redis_client: Any
) -> None:
    _send(consumer, "warm")  # the producer's connection and declarations, before the clock
    assert consumer.pop()
    assert not consumer.pop()  # the scan: every key empty, so the next pop blocks
    consumer.channel._brpop_start()  # a BLMOVE on ``celery``, 1 s at most
    _blocked(redis_client)
    _send(consumer, "main")
    assert consumer.channel._brpop_read()  # woken by the push: the BLMOVE's reply holds it
    assert consumer.got == ["warm", "main"]
    assert not consumer.pop()  # the scan again
    consumer.channel._brpop_start()
    consumer.app.send_task("noop", args=[], task_id="urgent", queue="celery", priority=6)
    started = time.monotonic()
    with pytest.raises(Empty):  # another key: the BLMOVE on the main key times out...
        consumer.channel._brpop_read()
    assert consumer.pop()  # ...and the next scan takes it
    assert time.monotonic() - started < 3.0
    assert consumer.got == ["warm", "main", "urgent"]


def _alive_key(consumer: Consumer) -> str:
    return consumer.prefix + "workerkit:celery:alive:w1"


def test_a_blocking_pop_waits_on_the_list_its_scan_registered_after_add_consumer(
    consumer: Consumer, redis_client: Any
) -> None:
    assert not consumer.pop()  # the empty scan registers the list of the next BLMOVE
    consumer.channel.basic_consume("other", False, lambda m: None, "t2")  # add_consumer
    consumer.channel._brpop_start()
    _blocked(redis_client)
    _send(consumer, "one")
    consumer.app.send_task("noop", args=[], task_id="two", queue="other")
    wait_until(lambda: len(_in_flight(redis_client)) == 1, timeout=10, what="one pop to land")
    # The worker dies before it reads the reply: recovery finds the entry.
    redis_client.delete(_alive_key(consumer))
    assert recover_abandoned(redis_client, consumer.prefix) == 1
    assert _in_flight(redis_client) == []


def test_a_late_blocking_pop_of_a_worker_found_gone_is_found_by_a_later_recovery(
    consumer: Consumer, redis_client: Any
) -> None:
    assert not consumer.pop()  # the empty scan; the worker stops before it sends its BLMOVE
    redis_client.delete(_alive_key(consumer))  # stopped past its liveness TTL
    assert recover_abandoned(redis_client, consumer.prefix) == 0  # found gone, nothing in flight
    consumer.channel._brpop_start()  # the worker goes on: its BLMOVE, late
    _blocked(redis_client)
    _send(consumer, "late")
    _until_in_flight(redis_client, ["late"])
    assert recover_abandoned(redis_client, consumer.prefix) == 1  # the next pass finds it
    assert _queued(redis_client, consumer.prefix) == ["late"]
    with pytest.raises(Empty):  # the reply: no longer in flight, not delivered here
        consumer.channel._brpop_read()
    assert consumer.pop()
    assert consumer.got == ["late"]


def test_a_gone_workers_lists_are_forgotten_after_the_window_and_registered_again(
    consumer: Consumer, redis_client: Any
) -> None:
    assert not consumer.pop()
    registry = consumer.prefix + "workerkit:celery:inflights"
    mine = consumer.flight.list_for("celery")
    assert redis_client.hexists(registry, mine)
    redis_client.delete(_alive_key(consumer))
    assert recover_abandoned(redis_client, consumer.prefix, forget_after=0.0) == 0
    wait_until(
        lambda: (
            recover_abandoned(redis_client, consumer.prefix, forget_after=0.0) == 0
            and redis_client.hlen(registry) == 0
        ),
        timeout=5,
        what="the lists of a worker gone past the window to be forgotten",
    )
    consumer.flight.keep_alive(consumer.client())  # the worker goes on: found its key gone
    assert redis_client.hexists(registry, mine)
    gone = consumer.prefix + "workerkit:celery:inflights:gone"
    assert redis_client.zscore(gone, "w1") is None


def test_a_stale_entry_in_its_own_list_is_delivered_by_the_next_scan(
    consumer: Consumer, redis_client: Any
) -> None:
    _send(consumer, "first")
    assert consumer.pop()  # this connection's pops: its give_back ran already
    _send(consumer, "stale")
    # A late command on a half-open old connection moves an entry in flight, after that.
    inflight = consumer.flight.list_for("celery")
    redis_client.lmove(consumer.prefix + "celery", inflight, "RIGHT", "LEFT")
    assert consumer.pop()  # the next scan delivers it from there
    assert consumer.got == ["first", "stale"]
    assert _in_flight(redis_client) == []
    assert redis_client.hlen(consumer.prefix + "unacked") == 2


def test_a_stale_entry_that_never_delivers_goes_to_the_dead_letters(
    consumer: Consumer, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _send(consumer, "first")
    assert consumer.pop()  # the first pop's own round (give_back) is behind it
    _send(consumer, "poison")
    inflight = consumer.flight.list_for("celery")
    redis_client.lmove(consumer.prefix + "celery", inflight, "RIGHT", "LEFT")

    def broken(message: Any, queue: str) -> None:
        raise RuntimeError("kombu fails on it")

    monkeypatch.setattr(consumer.channel.connection, "_deliver", broken)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            consumer.pop()
    assert _in_flight(redis_client) == ["poison"]
    assert not consumer.pop()  # the fourth time: dead-lettered, no loop
    assert _in_flight(redis_client) == []
    assert consumer.dead == [("celery", "left in flight undelivered after 3 tries")]


def test_a_message_popped_for_a_cancelled_consumer_goes_back_to_the_head_of_its_queue(
    consumer: Consumer, redis_client: Any
) -> None:
    _send(consumer, "a")
    _send(consumer, "b")
    consumer.channel._brpop_start()  # the scan pops "a"...
    _until_in_flight(redis_client, ["a"])
    consumer.channel.basic_cancel("t1")  # ...and its consumer is cancelled before the reply
    with pytest.raises(Empty):
        consumer.channel._brpop_read()
    assert _in_flight(redis_client) == []
    assert _queued(redis_client, consumer.prefix) == ["b", "a"]  # "a" at the head, in order
    assert redis_client.hlen(consumer.prefix + "unacked") == 0


def test_the_documented_rollback_command_returns_every_in_flight_entry(
    consumer: Consumer, redis_client: Any
) -> None:
    """docs/engines/celery.md (Limits): after a rollback to bare Celery."""
    doc = (Path(__file__).parents[2] / "docs/engines/celery.md").read_text()
    line = next(ln for ln in doc.splitlines() if ln.startswith("redis-cli EVAL "))
    script, rest = line.removeprefix('redis-cli EVAL "').split('" ', 1)
    registry = rest.split()[1]
    _send(consumer, "stuck")
    consumer.channel._brpop_start()  # popped, and the worker is gone for good
    _until_in_flight(redis_client, ["stuck"])
    assert redis_client.eval(script, 1, consumer.prefix + registry) >= 1
    assert _in_flight(redis_client) == []
    assert _queued(redis_client, consumer.prefix) == ["stuck"]
