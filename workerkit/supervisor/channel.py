"""The supervisor's end of the event channel (the messages are in :mod:`workerkit.events`).

A Unix stream socket in a private runtime directory (:mod:`workerkit.rundir`, mode 0700, so no
other user of the host can connect and fake job events), one reader task per connection that
decodes the lines and hands them to the runner, :meth:`Channel.broadcast` to send a command to
every connection, and :meth:`Channel.send_to` to send one to one process's connections. The
reader hands over every complete line of one read as one batch: a busy worker sends dozens of
events per write, and the supervisor shares the pod's cores with it, so it takes no event-loop
trip per event; and reads of one connection are up to ``COALESCE`` apart (one wake-up per
window under load, not one per write), less while its bytes come fast (about ``BATCH_BYTES`` a
read), so that a busy writer never waits for the window.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc

from workerkit import rundir
from workerkit.events import (
    SOCKET_ENV,
    BadMessage,
    CommandMessage,
    Event,
    Hello,
    PublishPresence,
    Release,
    RequestStop,
    WorkerReady,
    decode,
    encode,
)
from workerkit.supervisor.early import remove_stale_directories

__all__ = ("MAX_LINE_BYTES", "Channel", "Connection")

log = logging.getLogger(__name__)

#: The longest event line accepted; a connection that sends more is dropped.
MAX_LINE_BYTES: Final = 1024 * 1024
#: Bytes asked for per read: a batch of a few hundred events.
_READ_SIZE: Final = 65536
#: Reads of one connection are at least this far apart (seconds). A worker sends a job's start
#: at once (a kill right after it must not lose it), one write per job at concurrency 1; the
#: bytes are in the kernel's buffer from then on, read before the worker's exit is handled
#: (the runner waits for the connection's end). Each read costs the supervisor an event-loop
#: round (the socket, the inbox, the timer), ~0.8 ms of CPU on the bench machine, on the cores
#: the worker and its store share: RQ's forking worker (a job every 25-30 ms) was read once per
#: job with a 20 ms window, and a window of 100 ms reads it about once per 4 jobs. An event
#: written after a quiet spell (2 windows) is read at once.
COALESCE: Final = 0.1
#: ... but shorter while a connection's bytes come fast: cut until a read brings about this
#: many, doubled back (up to COALESCE) while reads bring under a quarter of it
#: (:func:`_next_window`). The window only saves wake-ups: it must never make the writer
#: wait. A busy SQL worker writes ~0.5 KB of events per job; at 100 ms per read, the 64 KB
#: read was the channel's limit (~640 KB/s), and the socket's buffer (~200 KB of kernel
#: memory, a few hundred writes) filled before the window ended, so the worker's next write
#: blocked until the read: `workerkit run sql` ran ~1,250 jobs/s at concurrency 8 where the
#: same worker ran ~3,000 without its events (2026-12-05). 16 KB is ~25 jobs' events.
BATCH_BYTES: Final = 16384
#: The shortest window: at most a read per millisecond, however fast the bytes come.
_MIN_WINDOW: Final = 0.001
#: ... but only from this long (seconds) after the connection opened: a worker's start (hello,
#: ready, its first jobs) is read at once.
COALESCE_AFTER: Final = 1.0
#: How long one command may take to reach one connection (a process that stopped reading must
#: not hold up the others or the supervisor's deadlines).
SEND_TIMEOUT: Final = 1.0

#: ``on_events(connection, events)``: the events of one read, in the order they were sent; a
#: line that is not a valid event is there as a :class:`~workerkit.events.BadMessage` (logged).
OnEvents = Callable[["Connection", Sequence[Event | BadMessage]], Awaitable[None]]


@dataclass(eq=False)
class Connection:
    """One connected process."""

    stream: anyio.abc.SocketStream
    number: int
    pid: int | None = None
    role: str | None = None
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    def describe(self) -> dict[str, Any]:
        return {"connection": self.number, "pid": self.pid, "role": self.role}


class Channel:
    """The socket server. Use as ``async with Channel(on_events) as channel:``.

    ``on_events(connection, events)`` is awaited for the events of each read of a connection
    (never an empty batch), in the order that connection sent them; it may apply backpressure
    (a bounded queue) without losing anything.
    """

    def __init__(self, on_events: OnEvents, *, directory: Path | None = None) -> None:
        self._on_events = on_events
        #: The runtime directory made beforehand for an early worker (supervisor/early.py).
        self._given = directory
        self._directory: Path | None = None
        self._listener: anyio.abc.SocketListener | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._connections: set[Connection] = set()
        self._count = 0
        self._changed = anyio.Event()
        #: Set by :meth:`read_promptly`: no read waits out its window any more.
        self._prompt = False
        self._hurry = anyio.Event()

    @property
    def path(self) -> str:
        """The socket's path, for ``WORKERKIT_SUPERVISOR_SOCKET``."""
        if self._directory is None:
            raise RuntimeError("the channel is not open")
        return str(self._directory / rundir.SOCKET_FILE)

    @property
    def connections(self) -> tuple[Connection, ...]:
        return tuple(self._connections)

    async def __aenter__(self) -> Channel:
        # Runtime directories of supervisors SIGKILLed with their workers go first (never ours:
        # a directory made beforehand for an early worker has a live owner).
        remove_stale_directories()
        self._directory = self._given if self._given is not None else rundir.create()
        try:
            self._listener = await anyio.create_unix_listener(self.path, mode=0o600)
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
        except BaseException:
            await self._cleanup()
            raise
        self._task_group.start_soon(self._accept_loop, name="workerkit-channel-accept")
        log.debug("channel listening", extra={"event": "channel_listening", "path": self.path})
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        try:
            return await self._task_group.__aexit__(exc_type, exc, tb)
        finally:
            await self._cleanup()

    async def _cleanup(self) -> None:
        for connection in list(self._connections):
            with contextlib.suppress(Exception):
                await connection.stream.aclose()
        self._connections.clear()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.aclose()
            self._listener = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        assert self._task_group is not None
        while True:
            stream = await self._listener.accept()
            self._count += 1
            connection = Connection(stream, self._count)
            self._connections.add(connection)
            self._notify()
            self._task_group.start_soon(self._read, connection, name="workerkit-channel-reader")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _read(self, connection: Connection) -> None:
        pending = bytearray()  # the start of a line whose end has not arrived yet
        read_at = -COALESCE  # when the last read returned (anyio's clock)
        ready_from: float | None = None  # when this connection's worker_ready was read
        busy = False  # the last read came soon after the one before it
        window = COALESCE  # shorter while the connection's bytes come fast (_next_window)
        steady_from = anyio.current_time() + COALESCE_AFTER
        try:
            while True:
                # A busy process's events wait in the socket's buffer for the rest of COALESCE
                # since the last read: one wake-up per window, not one per write. Not in a
                # connection's first second, nor after a quiet spell, nor on a worker's own
                # connection (not a job's executor) before its ready was read and for a second
                # after: a worker's ready and its first job's start must be known before a
                # SIGTERM that follows them is judged (before ready, the stop skips the drain
                # window), and a store that keeps a worker unready delays its ready at will.
                steady = read_at >= steady_from and (
                    ready_from is not None or _is_executor(connection.role)
                )
                wait = read_at + min(window, COALESCE) - anyio.current_time()
                if busy and wait > 0 and steady and not self._prompt:
                    with anyio.move_on_after(wait):
                        await self._hurry.wait()
                try:
                    chunk = await connection.stream.receive(_READ_SIZE)
                    now = anyio.current_time()
                    busy = now - read_at < 2 * COALESCE
                    window = _next_window(window, len(chunk))
                    read_at = now
                except (
                    anyio.EndOfStream,
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                    OSError,
                ):
                    return
                end = chunk.rfind(b"\n")
                if end < 0:
                    pending += chunk
                    if len(pending) > MAX_LINE_BYTES:
                        self._warn_too_long(connection)
                        return
                    continue
                lines = (bytes(pending) + chunk[:end] if pending else chunk[:end]).split(b"\n")
                pending[:] = chunk[end + 1 :]
                if len(pending) > MAX_LINE_BYTES or any(len(x) > MAX_LINE_BYTES for x in lines):
                    self._warn_too_long(connection)
                    return
                events = [
                    event for line in lines if (event := self._decode(connection, line)) is not None
                ]
                if ready_from is None and any(isinstance(e, WorkerReady) for e in events):
                    ready_from = read_at
                    steady_from = read_at + COALESCE_AFTER
                if events:
                    await self._on_events(connection, events)
        finally:
            self._connections.discard(connection)
            with contextlib.suppress(Exception):
                await connection.stream.aclose()
            self._notify()
            log.debug(
                "channel connection closed",
                extra={"event": "channel_disconnected", **connection.describe()},
            )

    @staticmethod
    def _warn_too_long(connection: Connection) -> None:
        log.warning(
            "event line too long; dropping the connection",
            extra={"event": "channel_line_too_long", **connection.describe()},
        )

    @staticmethod
    def _decode(connection: Connection, line: bytes) -> Event | BadMessage | None:
        if not line.strip():
            return None
        event = decode(line)
        if isinstance(event, RequestStop | Release | PublishPresence):
            event = BadMessage(f"a command ({event.name}) sent to the supervisor")
        if isinstance(event, BadMessage):
            log.warning(
                "bad event line ignored",
                extra={
                    "event": "channel_bad_event",
                    "reason": event.reason,
                    **connection.describe(),
                },
            )
        elif isinstance(event, Hello):
            connection.pid, connection.role = event.pid, event.role
            log.debug(
                "process connected", extra={"event": "channel_hello", **connection.describe()}
            )
        return event

    def read_promptly(self) -> None:
        """From now on read every connection as its bytes come, without the ``COALESCE`` wait
        (the supervisor is stopping: its drain is judged on the jobs in flight, and a worker's
        exit is handled only once its connection has been read to the end)."""
        self._prompt = True
        self._hurry.set()

    async def broadcast(self, command: CommandMessage) -> int:
        """Send ``command`` to every connected process; return to how many it was sent."""
        data = encode(command)
        sent = 0
        for connection in list(self._connections):
            sent += await self._send(connection, data, command.name)
        return sent

    async def send_to(self, pid: int, command: CommandMessage) -> int:
        """Send ``command`` to the connections of process ``pid`` only; return to how many.

        A connection is known by the pid of its ``hello``: one that has not said it yet is
        skipped (the next command finds it).
        """
        data = encode(command)
        sent = 0
        for connection in list(self._connections):
            if connection.pid == pid:
                sent += await self._send(connection, data, command.name)
        return sent

    async def _send(self, connection: Connection, data: bytes, name: str) -> bool:
        with anyio.move_on_after(SEND_TIMEOUT) as scope:
            try:
                async with connection.lock:
                    await connection.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                log.debug(
                    "command not delivered",
                    extra={
                        "event": "channel_send_failed",
                        "command": name,
                        "error": str(exc),
                        **connection.describe(),
                    },
                )
                return False
        if scope.cancelled_caught:
            log.warning(
                "command not delivered in time",
                extra={"event": "channel_send_timeout", "command": name},
            )
            return False
        return True

    async def wait_connections(self, count: int) -> None:
        """Wait until at least ``count`` processes are connected."""
        while len(self._connections) < count:
            await self._changed.wait()

    async def wait_closed(self, pids: set[int] | None = None) -> None:
        """Wait until no connection (of one of ``pids``, or none at all) is left.

        A dead process's socket is closed by the kernel, so its last events are read before the
        reader sees end-of-stream; waiting here puts those events ahead of the exit.
        """
        while any(pids is None or c.pid in pids or c.pid is None for c in self._connections):
            await self._changed.wait()

    def child_env(self) -> dict[str, str]:
        """The environment variable that points a child process at this channel."""
        return {SOCKET_ENV: self.path}


def _next_window(window: float, read: int) -> float:
    """The wait before a connection's next read, after one that returned ``read`` bytes: cut
    to what brings about ``BATCH_BYTES`` at that pace when it brought more, doubled (up to
    ``COALESCE``) when it brought under a quarter of that. Kept from read to read, so that a
    small read after a fast run (the backlog drained) does not reopen the whole window."""
    if read > BATCH_BYTES:
        return max(window * BATCH_BYTES / read, _MIN_WINDOW)
    if read < BATCH_BYTES // 4:
        return min(window * 2, COALESCE)
    return window


def _is_executor(role: str | None) -> bool:
    """A job's own process (its events come with the job's, never a ``worker_ready``)."""
    return role is not None and role.endswith("executor")
