"""The Celery consumer's reliable pop (engines/celery/pop.py) on a real kombu channel and Redis:
a pop is a move into the worker's in-flight list, the delivery takes it out, and what a lost
reply left there goes back to its queue once, at a new connection or by crash recovery."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from queue import Empty
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery

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


def _queued(redis_client: Any, prefix: str) -> list[str]:
    return [
        json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(prefix + "celery", 0, -1)
    ]


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
    assert not consumer.pop()  # the scan: every key empty, so the next pop blocks
    consumer.channel._brpop_start()  # a BLMOVE on ``celery``, 1 s at most
    threading.Timer(0.2, _send, (consumer, "main")).start()
    started = time.monotonic()
    assert consumer.channel._brpop_read()  # woken by the push, not by the timeout
    assert time.monotonic() - started < 0.9
    assert consumer.got == ["main"]
    assert not consumer.pop()  # the scan again
    consumer.channel._brpop_start()
    consumer.app.send_task("noop", args=[], task_id="urgent", queue="celery", priority=6)
    started = time.monotonic()
    with pytest.raises(Empty):  # another key: the BLMOVE on the main key times out...
        consumer.channel._brpop_read()
    assert consumer.pop()  # ...and the next scan takes it
    assert time.monotonic() - started < 3.0
    assert consumer.got == ["main", "urgent"]
