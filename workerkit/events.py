"""The local channel between the supervisor and every process that runs jobs.

The supervisor listens on a Unix stream socket whose path it puts in ``WORKERKIT_SUPERVISOR_SOCKET``
for its child; grandchildren (RQ's work horse, Celery's pool children) inherit the variable and
open their own connection. Each message is one JSON object on one line.

Processes send *events* (what happened to jobs, heartbeats, store health); the supervisor sends
*commands* back on the same connection (``request_stop`` at the drain deadline, ``release`` at the
interrupt deadline). Metrics are aggregated in the supervisor from the events, so nothing needs a
multiprocess metrics directory.

Fork safety: a connection belongs to the process that opened it. :func:`client` notices when it is
called in a forked child (the pid changed) and opens a fresh connection there instead of sharing
the parent's socket, whose bytes would interleave with the parent's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, Literal

__all__ = (
    "COMMANDS",
    "EVENT_TYPES",
    "OUTCOMES",
    "SOCKET_ENV",
    "Command",
    "EventClient",
    "EventType",
    "Outcome",
    "client",
    "decode",
    "encode",
)

log = logging.getLogger(__name__)

SOCKET_ENV: Final = "WORKERKIT_SUPERVISOR_SOCKET"

EventType = Literal[
    "hello",  # a process connected: {"pid", "role"}
    "worker_ready",  # the engine's worker consumes: {"engine", "queues", "concurrency"}
    "heartbeat",  # the worker loop is alive: {"pid"}
    "store_health",  # broker/store reachability: {"ok": bool, "reason": str}
    "queue_stats",  # {"depth": {queue: int}, "oldest_ready_age": {queue: seconds}}
    "job_started",  # {"job_id", "task", "queue", "attempt", "delivery", "queued_for"}
    "job_heartbeat",  # a running job's lease was extended: {"job_id"}
    "checkpoint_saved",  # {"job_id", "task", "queue"}
    # An idempotency key was looked up at the start of a run: {"task", "queue", "outcome"}, the
    # outcome one of workerkit.idempotency.IDEMPOTENCY_OUTCOMES: claimed, replayed, deferred,
    # taken_over, mismatched. "queue" is "" outside a job.
    "idempotency",
    "job_finished",  # {"job_id", "task", "queue", "outcome", "duration", "error"?}
    # Several job_finished at once, from an engine that batches its events (Celery's):
    # {"jobs": [[job_id, task, queue, outcome, duration], ...]}, in the order they finished.
    "jobs_finished",
    "worker_stopping",  # the worker stopped fetching: {"running": int}
]
EVENT_TYPES: Final[frozenset[str]] = frozenset(EventType.__args__)  # type: ignore[attr-defined]

Outcome = Literal[
    "succeeded",  # ran to completion and was acknowledged
    "failed",  # failed for good (attempts exhausted, or a permanent error such as an unknown task)
    "retried",  # failed and was scheduled to run again
    "released",  # handed back to the queue, checkpoint kept, attempt not consumed
    "skipped_duplicate",  # an idempotency key said it already ran; the stored result was replayed
    "deferred",  # another live attempt holds its idempotency key; back later, attempt not consumed
    "timed_out",  # exceeded its job timeout
    "lease_lost",  # another worker owns the job now; this attempt's result was fenced out
]
OUTCOMES: Final[frozenset[str]] = frozenset(Outcome.__args__)  # type: ignore[attr-defined]

Command = Literal["request_stop", "release"]
COMMANDS: Final[frozenset[str]] = frozenset(Command.__args__)  # type: ignore[attr-defined]

Message = dict[str, Any]


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as one line of JSON."""
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


def decode(line: bytes) -> Message:
    """One line back into a message; ValueError when it is not a JSON object."""
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("an event must be a JSON object")
    return value


class EventClient:
    """A job-running process's connection to its supervisor.

    ``send`` never raises: a supervisor that went away must not fail the job in hand. Commands
    that arrive are passed to the handlers registered with :meth:`on_command`, on a reader
    thread of this client.
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
        self.send("hello", role=self.role)

    def on_command(self, handler: Callable[[Command, Message], None]) -> None:
        """Call ``handler(command, message)`` for every command the supervisor sends."""
        self._handlers.append(handler)

    def send(self, event_type: EventType, **fields: Any) -> None:
        """Send one event; drop it (warning once) when the supervisor cannot be reached."""
        sock = self._sock
        if sock is None:
            return
        message = {"type": event_type, "pid": self.pid, "ts": time.time(), **fields}
        try:
            with self._send_lock:
                sock.sendall(encode(message))
        except OSError as exc:
            self._warn_closed(exc)

    @contextlib.contextmanager
    def writer(self) -> Iterator[Callable[[bytes], None] | None]:
        """Hold the send lock; yield a function that writes already-encoded event lines.

        For engines that batch events: nothing else this client sends is written in the middle
        of the batch, and of two batches the one prepared first is written first. Yields None
        when the supervisor cannot be reached. Write errors are dropped as in :meth:`send`.
        """
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
                try:
                    message = decode(line)
                except ValueError:
                    continue
                command = message.get("cmd")
                if command not in COMMANDS:
                    continue
                for handler in list(self._handlers):
                    try:
                        handler(command, message)
                    except Exception:
                        log.exception(
                            "command handler failed", extra={"event": "command_handler_failed"}
                        )

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


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
