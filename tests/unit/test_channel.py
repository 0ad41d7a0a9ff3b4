"""The supervisor's event socket: events in, in order; commands out to every connection."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from workerkit.events import (
    SOCKET_ENV,
    BadMessage,
    Event,
    Heartbeat,
    Hello,
    JobHeartbeat,
    Release,
    RequestStop,
    WorkerReady,
    encode,
)
from workerkit.supervisor import channel as channel_module
from workerkit.supervisor.channel import Channel, Connection

if TYPE_CHECKING:
    import pytest

Received = tuple[Event | BadMessage, tuple[int | None, str | None]]


def run_with_channel(body: object) -> list[Received]:
    """Run ``body(channel)``; return each event received with its connection's (pid, role)."""
    received: list[Received] = []

    async def on_events(connection: Connection, events: Sequence[Event | BadMessage]) -> None:
        assert events, "a batch is never empty"
        received.extend((event, (connection.pid, connection.role)) for event in events)

    async def main() -> None:
        async with Channel(on_events) as channel:
            await body(channel)  # type: ignore[operator]

    anyio.run(main)
    return received


async def connect(channel: Channel) -> anyio.abc.SocketStream:
    return await anyio.connect_unix(channel.path)


async def wait_connections(channel: Channel, count: int) -> None:
    with anyio.fail_after(5):
        await channel.wait_connections(count)


def test_socket_is_private_and_removed_on_close() -> None:
    seen: dict[str, str] = {}

    async def body(channel: Channel) -> None:
        seen["path"] = channel.path
        directory = Path(channel.path).parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert channel.child_env() == {SOCKET_ENV: channel.path}

    run_with_channel(body)
    assert not os.path.exists(Path(seen["path"]).parent)


def test_events_arrive_in_order_and_bad_lines_are_reported_in_place() -> None:
    async def body(channel: Channel) -> None:
        async with await connect(channel) as stream:
            await stream.send(encode(Hello("worker", pid=4242)))
            await stream.send(b'not json\n[1,2]\n\n{"type":"bogus"}\n' + encode(RequestStop()))
            await stream.send(encode(JobHeartbeat("1")))
            # One event split over two writes.
            line = encode(JobHeartbeat("2"))
            await stream.send(line[:5])
            await anyio.sleep(0.01)
            await stream.send(line[5:])
        with anyio.fail_after(5):
            await channel.wait_closed()

    received = run_with_channel(body)
    events = [event for event, _ in received]
    assert events == [
        Hello("worker", pid=4242),
        BadMessage("not JSON"),
        BadMessage("not a JSON object"),
        BadMessage("unknown event type 'bogus'"),
        BadMessage("a command (request_stop) sent to the supervisor"),
        JobHeartbeat("1"),
        JobHeartbeat("2"),
    ]
    # The hello names the process for every later event of its connection.
    assert {sender for _, sender in received} == {(4242, "worker")}


def test_broadcast_reaches_every_connection() -> None:
    async def body(channel: Channel) -> None:
        first, second = await connect(channel), await connect(channel)
        async with first, second:
            await wait_connections(channel, 2)
            assert await channel.broadcast(RequestStop()) == 2
            for stream in (first, second):
                data = await stream.receive()
                assert json.loads(data) == {"cmd": "request_stop"}

    run_with_channel(body)


def test_broadcast_skips_closed_connections() -> None:
    async def body(channel: Channel) -> None:
        stream = await connect(channel)
        await wait_connections(channel, 1)
        await stream.aclose()
        with anyio.fail_after(5):
            await channel.wait_closed()
        assert await channel.broadcast(Release()) == 0

    run_with_channel(body)


def test_an_oversized_line_drops_the_connection() -> None:
    async def body(channel: Channel) -> None:
        async with await connect(channel) as stream:
            await wait_connections(channel, 1)
            with contextlib.suppress(anyio.BrokenResourceError):
                await stream.send(b"x" * (1024 * 1024 + 10))
            with anyio.fail_after(5):
                await channel.wait_closed()

    assert run_with_channel(body) == []


def test_many_events_in_one_write_arrive_whole_and_in_order() -> None:
    lines = b"".join(encode(Heartbeat(running=n, ts=1000.0 + n)) for n in range(500))

    async def body(channel: Channel) -> None:
        async with await connect(channel) as stream:
            await stream.send(encode(Hello("executor", pid=7)) + lines[:7])
            await anyio.sleep(0.01)
            # The rest, with a line cut in the middle at the end of the first write.
            await stream.send(lines[7:])
        with anyio.fail_after(5):
            await channel.wait_closed()

    received = run_with_channel(body)
    beats = [event for event, _ in received[1:]]
    assert beats == [Heartbeat(running=n, ts=1000.0 + n) for n in range(500)]
    assert {sender for _, sender in received} == {(7, "executor")}


def test_a_busy_connection_is_read_once_per_window_not_once_per_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker writes a job's start at once, one write per job: 40 writes 1 ms apart are read
    in a few batches (the bytes wait in the socket's buffer), every event whole and in order.
    Before, each write woke the supervisor (~0.3 ms of its CPU per job on the bench machine)."""
    monkeypatch.setattr(channel_module, "COALESCE_AFTER", 0.0)  # past the start, at once
    batches: list[int] = []

    async def on_events(connection: Connection, events: Sequence[Event | BadMessage]) -> None:
        batches.append(len(events))

    async def main() -> None:
        async with Channel(on_events) as channel, await connect(channel) as stream:
            await stream.send(encode(Hello("worker", pid=11)) + encode(WorkerReady("sql")))
            for n in range(40):
                await stream.send(encode(Heartbeat(running=n, ts=1000.0 + n)))
                await anyio.sleep(0.001)
            await stream.aclose()
            with anyio.fail_after(5):
                await channel.wait_closed()

    anyio.run(main)
    assert sum(batches) == 42
    # 40 writes over >= 40 ms, read at most every 20 ms: a handful of reads (not 40).
    assert len(batches) <= 10, batches


def test_a_connection_that_writes_fast_is_read_before_its_buffer_fills(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The window saves wake-ups, never a writer's time: a connection whose bytes come fast is
    read as often as it takes to keep its writes from blocking. Before, one 64 KB read per
    window was all a connection got (with this 1 s window, 1 MB took over 15 s to write; with
    the real 100 ms one, a busy SQL worker blocked in every other write at ~1,250 jobs/s)."""
    monkeypatch.setattr(channel_module, "COALESCE_AFTER", 0.0)  # past the start, at once
    monkeypatch.setattr(channel_module, "COALESCE", 1.0)
    beats = [Heartbeat(running=n, ts=1000.0 + n) for n in range(20)]
    write = b"".join(encode(beat) for beat in beats)  # ~1.3 KB, a batch of a busy worker's
    writes = 1024 * 1024 // len(write)
    received: list[Event | BadMessage] = []

    async def on_events(connection: Connection, events: Sequence[Event | BadMessage]) -> None:
        received.extend(events)

    async def main() -> None:
        async with Channel(on_events) as channel, await connect(channel) as stream:
            await stream.send(encode(Hello("worker", pid=11)) + encode(WorkerReady("sql")))
            with anyio.fail_after(10):
                for _ in range(writes):
                    await stream.send(write)
            await stream.aclose()
            with anyio.fail_after(5):
                await channel.wait_closed()

    anyio.run(main)
    assert received[2:] == beats * writes


def test_a_connection_s_first_second_is_read_at_once() -> None:
    """A worker's hello, ready and first job's start, written in a burst: each read as it comes
    (none waits a window), so a SIGTERM right after them is judged knowing the worker is ready
    and has a job (before ready, the stop skips the drain window)."""
    batches: list[int] = []

    async def on_events(connection: Connection, events: Sequence[Event | BadMessage]) -> None:
        batches.append(len(events))

    async def main() -> None:
        async with Channel(on_events) as channel, await connect(channel) as stream:
            await stream.send(encode(Hello("worker", pid=11)))
            for n in range(5):
                await anyio.sleep(0.005)
                await stream.send(encode(Heartbeat(running=n, ts=1000.0 + n)))
                await anyio.sleep(0.005)  # the supervisor's loop reads it meanwhile
            await stream.aclose()
            with anyio.fail_after(5):
                await channel.wait_closed()

    anyio.run(main)
    assert batches == [1] * 6, batches


def test_after_read_promptly_each_write_is_read_as_it_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the first stop signal on (the runner calls ``read_promptly``), no read waits out its
    window: the drain sees each job's start and finish as it is written. A reader already
    waiting out a window is woken."""
    monkeypatch.setattr(channel_module, "COALESCE_AFTER", 0.0)  # past the start, at once
    monkeypatch.setattr(channel_module, "COALESCE", 5.0)  # a window no test waits out
    batches: list[int] = []
    got = anyio.Event()

    async def on_events(connection: Connection, events: Sequence[Event | BadMessage]) -> None:
        batches.append(len(events))
        got.set()

    async def main() -> None:
        nonlocal got
        async with Channel(on_events) as channel, await connect(channel) as stream:
            await stream.send(encode(Hello("worker", pid=11)) + encode(WorkerReady("sql")))
            with anyio.fail_after(2):
                await got.wait()
            got = anyio.Event()
            await stream.send(encode(Heartbeat(running=0, ts=1000.0)))
            with anyio.fail_after(2):
                await got.wait()  # read at once: the last read was a quiet spell ago
            # The reader now waits out its 5 s window; the stop signal ends the wait.
            got = anyio.Event()
            await stream.send(encode(Heartbeat(running=1, ts=1001.0)))
            await anyio.sleep(0.05)
            assert batches == [2, 1], batches  # held in the socket's buffer
            channel.read_promptly()
            with anyio.fail_after(2):
                await got.wait()
            for n in range(3):
                got = anyio.Event()
                await stream.send(encode(Heartbeat(running=n, ts=1002.0 + n)))
                with anyio.fail_after(2):
                    await got.wait()
            await stream.aclose()
            with anyio.fail_after(5):
                await channel.wait_closed()

    anyio.run(main)
    assert batches == [2, 1, 1, 1, 1, 1], batches


def test_a_worker_s_connection_is_read_at_once_until_its_ready_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the first second, a worker whose store kept it unready writes its ready and first
    job's start: both are read as they come (a SIGTERM right after them must find the worker
    ready, or the stop would skip the drain window)."""
    monkeypatch.setattr(channel_module, "COALESCE_AFTER", 0.0)  # past the start, at once
    monkeypatch.setattr(channel_module, "COALESCE", 5.0)  # a window no test waits out
    batches: list[tuple[str | None, int]] = []
    got = anyio.Event()

    async def on_events(connection: Connection, events: Sequence[Event | BadMessage]) -> None:
        batches.append((connection.role, len(events)))
        got.set()

    async def write_and_wait(stream: anyio.abc.SocketStream, data: bytes) -> None:
        nonlocal got
        got = anyio.Event()
        await stream.send(data)
        with anyio.fail_after(2):
            await got.wait()  # read at once: no 5 s window waited out

    async def main() -> None:
        async with Channel(on_events) as channel, await connect(channel) as stream:
            await write_and_wait(stream, encode(Hello("worker", pid=11)))
            for n in range(4):  # busy, unready: each write read as it comes
                await write_and_wait(stream, encode(Heartbeat(running=n, ts=1000.0 + n)))
            await write_and_wait(stream, encode(WorkerReady("sql")))
            channel.read_promptly()  # the reader now waits out a window: the close ends it
            await stream.aclose()
            with anyio.fail_after(5):
                await channel.wait_closed()

    anyio.run(main)
    assert batches == [("worker", 1)] * 6, batches
