"""The worker's presence publisher, on an in-memory store: lazy, never in the reader's way."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tests.support.presence_memory import MemoryPresenceStore
from workerkit.engines.presence import Presence
from workerkit.engines.presence_publisher import PresencePublisher, install_presence

if TYPE_CHECKING:
    import pytest

RECORD = Presence(
    worker_id="pod:1:0a1b2c3d",
    hostname="pod",
    pid=1,
    engine="sql",
    queues=("default",),
    concurrency=2,
    state="ready",
    started_at=100.0,
    heartbeat_at=101.0,
    ttl=15.0,
)


class FakeClient:
    def __init__(self) -> None:
        self.handlers: list[Callable[[str, dict[str, Any]], None]] = []

    def on_command(self, handler: Callable[[str, dict[str, Any]], None]) -> None:
        self.handlers.append(handler)

    def command(self, name: str, **fields: Any) -> None:
        for handler in self.handlers:  # as EventClient's reader thread calls them
            handler(name, {"cmd": name, **fields})

    def presence(self, record: Presence) -> None:
        self.command("presence", presence=record)


def wait_until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def install(store: MemoryPresenceStore) -> tuple[FakeClient, PresencePublisher, list[int]]:
    client, opened = FakeClient(), []

    def open_store() -> MemoryPresenceStore:
        opened.append(threading.get_ident())
        return store

    publisher = install_presence(client, open_store)  # type: ignore[arg-type]
    return client, publisher, opened


def test_the_store_opens_on_the_first_record_in_a_thread_of_its_own_and_stamps_it() -> None:
    store = MemoryPresenceStore(clock=lambda: 5000.0)
    client, publisher, opened = install(store)
    client.command("request_stop")
    client.command("presence", presence="not a record")
    assert opened == []  # nothing to write yet: the store is not even opened
    client.presence(RECORD)
    wait_until(lambda: store.records)
    assert opened != [threading.get_ident()]  # opened off the reader thread
    assert store.records[RECORD.worker_id] == dataclasses.replace(RECORD, heartbeat_at=5000.0)
    draining = dataclasses.replace(RECORD, state="draining", drain_deadline=9.0, jobs=("j",))
    client.presence(draining)
    wait_until(lambda: store.records[RECORD.worker_id].state == "draining")
    assert store.records[RECORD.worker_id].jobs == ("j",)
    assert len(opened) == 1
    publisher.close()


def test_a_slow_store_never_blocks_the_reader_and_only_the_latest_record_is_written() -> None:
    store = MemoryPresenceStore()
    store.gate.clear()  # every write hangs until the gate opens
    client, publisher, _ = install(store)
    started = time.monotonic()
    for n in range(50):
        client.presence(dataclasses.replace(RECORD, concurrency=n))
    assert time.monotonic() - started < 0.5
    store.gate.set()
    wait_until(lambda: store.records.get(RECORD.worker_id, RECORD).concurrency == 49)
    assert len(store.published) <= 2  # the first one (already taken), then the latest
    publisher.close()


def test_an_outage_warns_once_and_the_next_record_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workerkit.engines.presence_publisher")
    store = MemoryPresenceStore()
    store.error = ConnectionError("store down")
    client, publisher, _ = install(store)
    for _ in range(3):
        client.presence(RECORD)
        time.sleep(0.05)
    wait_until(lambda: any(r.message.startswith("presence not") for r in caplog.records))
    time.sleep(0.1)
    failed = [r for r in caplog.records if getattr(r, "event", "") == "presence_publish_failed"]
    assert len(failed) == 1
    assert failed[0].levelno == logging.WARNING
    assert "store down" in failed[0].getMessage()
    store.error = None
    client.presence(RECORD)
    wait_until(lambda: store.records)
    assert any(getattr(r, "event", "") == "presence_publish_resumed" for r in caplog.records)
    publisher.close()


def test_a_store_that_cannot_be_opened_is_opened_again_at_the_next_record() -> None:
    store, attempts = MemoryPresenceStore(), []

    def open_store() -> MemoryPresenceStore:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("cannot connect")
        return store

    client = FakeClient()
    publisher = install_presence(client, open_store)  # type: ignore[arg-type]
    client.presence(RECORD)
    wait_until(lambda: attempts)
    time.sleep(0.05)
    client.presence(RECORD)
    wait_until(lambda: store.records)
    assert len(attempts) == 2
    publisher.close()


def test_close_removes_the_record_is_idempotent_and_nothing_is_written_after_it() -> None:
    store = MemoryPresenceStore()
    client, publisher, _ = install(store)
    client.presence(RECORD)
    wait_until(lambda: store.records)
    publisher.close()
    publisher.close()
    assert store.records == {}
    assert store.removed == [RECORD.worker_id]
    client.presence(RECORD)  # a record that arrives during the exit
    time.sleep(0.05)
    assert store.records == {}


def test_close_without_any_record_opens_nothing() -> None:
    store = MemoryPresenceStore()
    _, publisher, opened = install(store)
    publisher.close()
    assert (opened, store.removed) == ([], [])


def test_close_gives_up_on_a_store_that_hangs(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryPresenceStore()
    client, publisher, _ = install(store)
    client.presence(RECORD)
    wait_until(lambda: store.records)
    store.gate.clear()
    client.presence(RECORD)  # this write hangs
    time.sleep(0.05)
    started = time.monotonic()
    publisher.close(timeout=0.2)
    assert time.monotonic() - started < 1.0
    assert any(getattr(r, "event", "") == "presence_remove_failed" for r in caplog.records)
    store.gate.set()
