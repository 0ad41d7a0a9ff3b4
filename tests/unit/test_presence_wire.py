"""The ``presence`` command on the wire: its form, its validation, who receives it."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from workerkit.engines.presence import Presence
from workerkit.events import (
    COMMANDS,
    BadMessage,
    EventClient,
    Hello,
    PublishPresence,
    Release,
    RequestStop,
    WorkerReady,
    decode,
    decode_message,
    encode,
)
from workerkit.supervisor.channel import Channel

RECORD = Presence(
    worker_id="pod-1:41:0a1b2c3d",
    hostname="pod-1",
    pid=41,
    engine="sql",
    queues=("default", "batch"),
    concurrency=4,
    state="draining",
    started_at=1_700_000_000.5,
    heartbeat_at=1_700_000_100.0,
    ttl=15.0,
    drain_deadline=1_700_000_104.0,
    hard_deadline=1_700_000_105.6,
    jobs=("j1", "j2"),
    counts={"default": {"succeeded": 10, "failed": 1}},
)


def wire(**changes: Any) -> dict[str, Any]:
    record = json.loads(RECORD.to_json())
    record.update(changes)
    return {"cmd": "presence", "presence": {k: v for k, v in record.items() if v is not ...}}


def test_the_presence_command_carries_the_record_as_one_json_object() -> None:
    line = encode(PublishPresence(RECORD))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line) == {"cmd": "presence", "presence": json.loads(RECORD.to_json())}
    assert decode(line) == PublishPresence(RECORD)
    assert "presence" in COMMANDS
    assert len(line) < 400  # a record is a few hundred bytes, sent every few seconds


def test_the_commands_without_fields_are_written_as_before() -> None:
    assert encode(RequestStop()) == b'{"cmd":"request_stop"}\n'
    assert encode(Release()) == b'{"cmd":"release"}\n'
    assert decode(b'{"cmd":"release","later":1}') is decode(encode(Release()))


def test_a_worker_ready_without_a_worker_id_reads_as_before() -> None:
    line = b'{"type":"worker_ready","pid":1,"ts":1,"engine":"rq","queues":["q"],"concurrency":1}'
    assert decode(line) == WorkerReady("rq", ("q",), 1, None)


def test_optional_and_unknown_fields_of_a_record() -> None:
    message = wire(drain_deadline=..., hard_deadline=..., jobs=..., counts=..., newer="x")
    decoded = decode_message(message)
    assert isinstance(decoded, PublishPresence)
    assert decoded.presence.drain_deadline is None
    assert decoded.presence.jobs == ()
    assert decoded.presence.counts == {}


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"cmd": "presence"}, "presence: presence is not an object"),
        (wire(worker_id=...), "presence: worker_id is missing"),
        (wire(worker_id=7), "presence: worker_id is not a string"),
        (wire(pid=True), "presence: pid is not an integer"),
        (wire(pid=4.5), "presence: pid is not an integer"),
        (wire(queues=["a", 1]), "presence: queues is not a list of strings"),
        (
            wire(state="asleep"),
            "presence: state is not one of starting, ready, draining, releasing, stopped",
        ),
        (wire(started_at="now"), "presence: started_at is not a number"),
        (wire(drain_deadline="soon"), "presence: drain_deadline is not a number"),
        (wire(counts={"q": 3}), "presence: counts is not an object of objects"),
        (wire(counts={"q": {"succeeded": 1.5}}), "presence: counts is not an integer"),
        ({"cmd": "presents"}, "unknown event type 'None'"),
    ],
)
def test_a_bad_record_says_why(message: dict[str, Any], reason: str) -> None:
    assert decode_message(message) == BadMessage(reason)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    yield path, listener
    listener.close()


def test_the_client_hands_the_typed_record_to_its_handlers(
    server: tuple[str, socket.socket],
) -> None:
    path, listener = server
    client = EventClient(path, role="worker")
    conn, _ = listener.accept()
    got: list[tuple[str, dict[str, Any]]] = []
    arrived = threading.Event()

    def handler(command: str, message: dict[str, Any]) -> None:
        got.append((command, message))
        if command == "release":
            arrived.set()

    client.on_command(handler)
    bad = json.dumps(wire(pid="x")).encode() + b"\n"
    try:
        conn.sendall(bad + encode(PublishPresence(RECORD)) + encode(Release()))
        assert arrived.wait(5)
    finally:
        client.close()
        conn.close()
    assert got == [
        ("presence", {"cmd": "presence", "presence": RECORD}),
        ("release", {"cmd": "release"}),
    ]


def test_the_channel_sends_to_one_process_only_and_takes_no_command_from_one() -> None:
    received: list[object] = []
    three = anyio.Event()

    async def on_events(connection: object, events: list[object]) -> None:
        received.extend(events)
        if len(received) >= 3:
            three.set()

    async def main() -> None:
        async with Channel(on_events) as channel:  # type: ignore[arg-type]
            worker, child, silent = [await anyio.connect_unix(channel.path) for _ in range(3)]
            async with worker, child, silent:
                await worker.send(encode(Hello("worker", pid=101)))
                await child.send(encode(Hello("executor", pid=102)))
                await worker.send(encode(PublishPresence(RECORD)))
                with anyio.fail_after(5):
                    await three.wait()
                assert await channel.send_to(101, PublishPresence(RECORD)) == 1
                assert await channel.send_to(999, PublishPresence(RECORD)) == 0
                assert decode(await worker.receive()) == PublishPresence(RECORD)
                await channel.broadcast(Release())
                for stream in (worker, child, silent):  # the others got only the broadcast
                    assert decode(await stream.receive()) == Release()

    anyio.run(main)
    assert BadMessage("a command (presence) sent to the supervisor") in received
