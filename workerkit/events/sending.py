"""The sending end of the event channel: a process's client, and the batching sender.

Fork safety: :func:`client` opens a fresh connection in a forked child (the pid changed) instead
of sharing the parent's socket, whose bytes would interleave with the parent's; and a client
object a child inherited (an attribute of a forked worker) writes nothing: its events would
reach the supervisor as the parent's, under the parent's pid.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

from workerkit.events.messages import (
    Command,
    CommandMessage,
    Event,
    Hello,
    Message,
    PublishPresence,
    Release,
    RequestStop,
)
from workerkit.events.wire import Pending, decode, encode, encode_batch

__all__ = ("BATCH_DELAY", "SOCKET_ENV", "BatchingSender", "EventClient", "client")

log = logging.getLogger("workerkit.events")

SOCKET_ENV: Final = "WORKERKIT_SUPERVISOR_SOCKET"
#: How long a :class:`BatchingSender`'s event may wait to share one write with the next ones.
BATCH_DELAY: Final = 0.1


class EventClient:
    """A job-running process's connection to its supervisor.

    ``send`` never raises: a supervisor that went away must not fail the job in hand. Commands
    that arrive are passed to the handlers registered with :meth:`on_command`, on a reader
    thread of this client (a handler must not block it: the next command waits).
    """

    def __init__(self, path: str | None, *, role: str) -> None:
        self.path = path
        self.role = role
        self.pid = os.getpid()
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._handlers: list[Callable[[Command, Message], None]] = []
        self._warned = False
        if path:
            self._connect(path)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _connect(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            log.warning(
                "supervisor channel unreachable",
                extra={"event": "channel_unreachable", "error": str(exc)},
            )
            return
        self._sock = sock
        threading.Thread(target=self._read_commands, name="workerkit-commands", daemon=True).start()
        self.send(Hello(self.role))

    def on_command(self, handler: Callable[[Command, Message], None]) -> None:
        """Call ``handler(command, message)`` for every command the supervisor sends.

        ``message`` is ``{"cmd": command}``, and for ``presence`` also ``"presence"``: the
        :class:`~workerkit.engines.presence.Presence` record. A handler ignores a command it
        does not know (a newer supervisor may send more).
        """
        self._handlers.append(handler)

    def send(self, event: Event) -> None:
        """Send one event; drop it (warning once) when the supervisor cannot be reached.

        Dropped too in a process forked from the one that made this client (see the module).
        """
        sock = self._sock
        if sock is None or os.getpid() != self.pid:
            return
        data = encode(event, pid=self.pid)
        try:
            with self._send_lock:
                sock.sendall(data)
        except OSError as exc:
            self._warn_closed(exc)

    @contextlib.contextmanager
    def writer(self) -> Iterator[Callable[[bytes], None] | None]:
        """Hold the send lock; yield a function that writes already-encoded event lines.

        For :class:`BatchingSender`: nothing else this client sends is written in the middle
        of the batch, and of two batches the one prepared first is written first. Yields None
        when the supervisor cannot be reached. Write errors are dropped as in :meth:`send`.
        """
        if os.getpid() != self.pid:
            # A forked child: checked before the lock, which another thread of the parent may
            # have held at the fork (a lock is copied locked, and nobody would release it).
            yield None
            return
        with self._send_lock:
            sock = self._sock
            if sock is None:
                yield None
                return

            def write(data: bytes) -> None:
                try:
                    sock.sendall(data)
                except OSError as exc:
                    self._warn_closed(exc)

            yield write

    def _warn_closed(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "supervisor channel closed; events are dropped",
                extra={"event": "channel_closed", "error": str(exc)},
            )

    def _read_commands(self) -> None:
        sock = self._sock
        assert sock is not None
        buffer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = decode(line)
                if isinstance(command, RequestStop | Release | PublishPresence):
                    self._dispatch(command)

    def _dispatch(self, command: CommandMessage) -> None:
        message: Message = {"cmd": command.name}
        if type(command) is PublishPresence:
            message["presence"] = command.presence
        for handler in list(self._handlers):
            try:
                handler(command.name, dict(message))
            except Exception:
                log.exception("command handler failed", extra={"event": "command_handler_failed"})

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class BatchingSender:
    """Sends a process's frequent events (its jobs') in batches: one write per batch.

    An event goes out at once only when nothing went out in the last ``delay`` (an idle worker
    reports at once); under load a flusher thread writes what gathered, in one write (see
    :func:`encode_batch`), at most ``delay`` later. Thread-safe; one per process (a forked
    child makes its own). docs/operations/lifecycle.md says when the delay is harmless.
    """

    def __init__(self, client: EventClient, *, delay: float = BATCH_DELAY) -> None:
        self.pid = os.getpid()
        self.client = client
        self.delay = delay
        # Encoded when written: a JobStarted whose job succeeds in the same batch never is.
        self._queue: collections.deque[Pending] = collections.deque()
        self._wake = threading.Event()
        self._last_write = 0.0
        self._flusher: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self.client.connected

    def send(self, event: Event) -> None:
        if not self.client.connected:
            return
        # deque.append and popleft are atomic: the senders' threads and the flusher share the
        # queue without a lock.
        self._queue.append((event, time.time()))
        if time.monotonic() - self._last_write >= self.delay:
            self.flush()
        elif not self._wake.is_set():
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_later, name="workerkit-events", daemon=True
                )
                self._flusher.start()
            self._wake.set()

    def send_now(self, event: Event) -> None:
        """Send ``event`` at once, in one write with the events gathered before it (a job's
        start: a worker killed right after it must be known to have had the job)."""
        if not self.client.connected:
            return
        self._queue.append((event, time.time()))
        self.flush()

    def flush(self) -> None:
        """Write every event that gathered, in one write."""
        # The client's send lock: its other events are never written in the middle of ours,
        # and of two flushes, the one that took the older events writes them first.
        with self.client.writer() as write:
            if write is None:
                self._queue.clear()
                return
            batch = []
            with contextlib.suppress(IndexError):
                while True:
                    batch.append(self._queue.popleft())
            if not batch:
                return
            self._last_write = time.monotonic()
            write(encode_batch(self.pid, batch))

    def _flush_later(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.delay)
            self._wake.clear()
            self.flush()


_client: EventClient | None = None
_client_lock = threading.Lock()


def client(role: str = "executor") -> EventClient:
    """This process's client, connected on first use (and again in a forked child)."""
    global _client
    with _client_lock:
        if _client is None or _client.pid != os.getpid():
            _client = EventClient(os.environ.get(SOCKET_ENV), role=role)
        return _client


def _forget_parent_client() -> None:
    # In a forked child (RQ's work horse, Celery's prefork pool) the parent's lock may have been
    # held by another thread at fork time and would never be released here, and the parent's
    # socket would interleave our bytes with its own. Start afresh; the parent keeps its copy.
    global _client, _client_lock
    _client_lock = threading.Lock()
    _client = None


os.register_at_fork(after_in_child=_forget_parent_client)
