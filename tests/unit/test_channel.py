"""The supervisor's event socket: events in, in order; commands out to every connection."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.abc

from workerkit.events import SOCKET_ENV, Message, encode
from workerkit.supervisor.channel import Channel, Connection


def run_with_channel(body: object) -> list[Message]:
    received: list[Message] = []

    async def on_events(connection: Connection, messages: Sequence[Message]) -> None:
        assert messages, "a batch is never empty"
        received.extend({**m, "_from": (connection.pid, connection.role)} for m in messages)

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


def test_events_arrive_in_order_and_bad_lines_are_skipped() -> None:
    async def body(channel: Channel) -> None:
        async with await connect(channel) as stream:
            await stream.send(encode({"type": "hello", "pid": 4242, "role": "worker"}))
            await stream.send(b"not json\n[1,2]\n\n" + encode({"type": "bogus"}))
            await stream.send(encode({"type": "heartbeat", "n": 1}))
            # One event split over two writes.
            line = encode({"type": "heartbeat", "n": 2})
            await stream.send(line[:5])
            await anyio.sleep(0.01)
            await stream.send(line[5:])
        with anyio.fail_after(5):
            await channel.wait_closed()

    received = run_with_channel(body)
    assert [m["type"] for m in received] == ["hello", "heartbeat", "heartbeat"]
    assert [m.get("n") for m in received[1:]] == [1, 2]
    # The hello names the process for every later event of its connection.
    assert {m["_from"] for m in received} == {(4242, "worker")}


def test_broadcast_reaches_every_connection() -> None:
    async def body(channel: Channel) -> None:
        first, second = await connect(channel), await connect(channel)
        async with first, second:
            await wait_connections(channel, 2)
            assert await channel.broadcast("request_stop") == 2
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
        assert await channel.broadcast("release") == 0

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
    lines = b"".join(encode({"type": "heartbeat", "n": n}) for n in range(500))

    async def body(channel: Channel) -> None:
        async with await connect(channel) as stream:
            await stream.send(encode({"type": "hello", "pid": 7, "role": "executor"}) + lines[:7])
            await anyio.sleep(0.01)
            # The rest, with a line cut in the middle at the end of the first write.
            await stream.send(lines[7:])
        with anyio.fail_after(5):
            await channel.wait_closed()

    received = run_with_channel(body)
    assert [m.get("n") for m in received[1:]] == list(range(500))
    assert {m["_from"] for m in received} == {(7, "executor")}
