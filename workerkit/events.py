"""Typed events and commands between job-running processes and their supervisor; the senders.

Each message is one JSON object on one line over a Unix socket (``WORKERKIT_SUPERVISOR_SOCKET``);
docs/operations/lifecycle.md describes every message and field. :func:`decode` is the one place
a line is validated: into a typed event or command, or a :class:`BadMessage`, never an exception.
Fork safety: :func:`client` opens a fresh connection in a forked child (the pid changed) instead
of sharing the parent's socket, whose bytes would interleave with the parent's.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, NamedTuple, overload

__all__ = (
    "BATCH_DELAY",
    "COMMANDS",
    "EVENT_TYPES",
    "IDEMPOTENCY_OUTCOMES",
    "OUTCOMES",
    "SOCKET_ENV",
    "BadMessage",
    "BatchingSender",
    "CheckpointSaved",
    "Command",
    "CommandMessage",
    "Event",
    "EventClient",
    "EventType",
    "FinishedJob",
    "Heartbeat",
    "Hello",
    "Idempotency",
    "IdempotencyOutcome",
    "JobFinished",
    "JobHeartbeat",
    "JobOutcome",
    "JobStarted",
    "JobsFinished",
    "Message",
    "Outcome",
    "Pending",
    "QueueStats",
    "Release",
    "RequestStop",
    "StoreHealth",
    "WorkerReady",
    "WorkerStopping",
    "client",
    "decode",
    "decode_message",
    "encode",
    "encode_batch",
)

log = logging.getLogger(__name__)

SOCKET_ENV: Final = "WORKERKIT_SUPERVISOR_SOCKET"
#: How long a :class:`BatchingSender`'s event may wait to share one write with the next ones.
BATCH_DELAY: Final = 0.1

EventType = Literal[
    "hello",
    "worker_ready",
    "heartbeat",
    "store_health",
    "queue_stats",
    "job_started",
    "job_heartbeat",
    "checkpoint_saved",
    "idempotency",
    "job_finished",
    "jobs_finished",
    "worker_stopping",
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
#: A settled job's outcome as decoded: one the sender may not name is read as ``unknown``.
JobOutcome = Literal[Outcome, "unknown"]

#: The ``outcome`` of an ``idempotency`` event (workerkit.idempotency's decisions).
IdempotencyOutcome = Literal["claimed", "replayed", "deferred", "taken_over", "mismatched"]
IDEMPOTENCY_OUTCOMES: Final[frozenset[str]] = frozenset(IdempotencyOutcome.__args__)  # type: ignore[attr-defined]

Command = Literal["request_stop", "release"]
COMMANDS: Final[frozenset[str]] = frozenset(Command.__args__)  # type: ignore[attr-defined]

#: A message as a plain dict (what a command handler receives with the command's name).
Message = dict[str, Any]


# --- events (a process -> its supervisor) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """A process connected (every connection's first event); ``pid`` is the sender's."""

    name: ClassVar[EventType] = "hello"
    role: str | None = None
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """The engine's worker consumes jobs."""

    name: ClassVar[EventType] = "worker_ready"
    engine: str | None = None
    queues: tuple[str, ...] = ()
    concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The worker loop is alive; ``ts`` is the sender's wall time."""

    name: ClassVar[EventType] = "heartbeat"
    running: int | None = None
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """Whether the worker reached its broker or store; ``reason`` is one line, never a secret."""

    name: ClassVar[EventType] = "store_health"
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Ready jobs, and the age of the oldest one in seconds, per queue."""

    name: ClassVar[EventType] = "queue_stats"
    depth: Mapping[str, float] = dataclasses.field(default_factory=dict)
    oldest_ready_age: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JobStarted:
    """A delivery is in flight; ``delivery`` is what the engine needs to release it."""

    name: ClassVar[EventType] = "job_started"
    job_id: str
    task: str | None = None
    queue: str | None = None
    attempt: int | None = None
    delivery: Mapping[str, Any] | None = None
    queued_for: float | None = None


@dataclass(frozen=True, slots=True)
class JobHeartbeat:
    """A running job's lease was extended."""

    name: ClassVar[EventType] = "job_heartbeat"
    job_id: str


@dataclass(frozen=True, slots=True)
class CheckpointSaved:
    """A running job saved a checkpoint (no task or queue: those of its ``job_started``)."""

    name: ClassVar[EventType] = "checkpoint_saved"
    job_id: str
    task: str | None = None
    queue: str | None = None


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An idempotency key was looked up at the start of a run (``queue`` "" outside a job)."""

    name: ClassVar[EventType] = "idempotency"
    task: str
    queue: str
    outcome: IdempotencyOutcome


@dataclass(frozen=True, slots=True)
class JobFinished:
    """A delivery was settled (no task or queue: those of its ``job_started``)."""

    name: ClassVar[EventType] = "job_finished"
    job_id: str
    task: str | None = None
    queue: str | None = None
    outcome: JobOutcome = "unknown"
    duration: float | None = None


class FinishedJob(NamedTuple):
    """One job of a :class:`JobsFinished` batch, in its wire order (a tuple: one per job)."""

    job_id: str
    task: str | None
    queue: str | None
    outcome: JobOutcome
    duration: float | None


@dataclass(frozen=True, slots=True)
class JobsFinished:
    """Several ``job_finished`` at once, in the order they finished (Celery batches them)."""

    name: ClassVar[EventType] = "jobs_finished"
    jobs: tuple[FinishedJob, ...]


@dataclass(frozen=True, slots=True)
class WorkerStopping:
    """The worker stopped fetching, whether or not it was asked to."""

    name: ClassVar[EventType] = "worker_stopping"
    running: int | None = None


Event = (
    Hello
    | WorkerReady
    | Heartbeat
    | StoreHealth
    | QueueStats
    | JobStarted
    | JobHeartbeat
    | CheckpointSaved
    | Idempotency
    | JobFinished
    | JobsFinished
    | WorkerStopping
)


# --- commands (the supervisor -> every process) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestStop:
    """The drain deadline: every running job's ``stop_requested`` turns true."""

    name: ClassVar[Command] = "request_stop"


@dataclass(frozen=True, slots=True)
class Release:
    """The interrupt deadline: interrupt what still runs and release it to its queue."""

    name: ClassVar[Command] = "release"


CommandMessage = RequestStop | Release


@dataclass(frozen=True, slots=True)
class BadMessage:
    """A line that is not a valid event or command, and why (the decoder's only failure)."""

    reason: str


# --- the wire form ------------------------------------------------------------------------------


class _Invalid(ValueError):
    pass


def _seconds(value: object) -> float | None:
    """A number of seconds (or a count), never negative; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid("not a number")
    return max(0.0, float(value))


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise _Invalid("not a list of strings")


def _per_queue(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise _Invalid("not an object")
    per_queue = {}
    for queue, number in value.items():
        seconds = _seconds(number)
        if seconds is None:
            raise _Invalid("not an object of numbers")
        per_queue[queue] = seconds
    return per_queue


def _job_outcome(value: object) -> JobOutcome:
    if isinstance(value, str) and value in OUTCOMES:
        return value  # type: ignore[return-value]
    return "unknown"  # a label set must stay bounded whatever a process sends


def _idempotency_outcome(value: object) -> IdempotencyOutcome:
    if isinstance(value, str) and value in IDEMPOTENCY_OUTCOMES:
        return value  # type: ignore[return-value]
    raise _Invalid("not an idempotency outcome")


def _finished_jobs(value: object) -> tuple[FinishedJob, ...]:
    """The well-formed jobs of a batch; a malformed one is skipped, not the whole batch."""
    if not isinstance(value, list):
        raise _Invalid("not a list")
    jobs = []
    make = tuple.__new__  # a tuple per job, without NamedTuple's keyword handling
    for item in value:
        if not (isinstance(item, list) and len(item) == 5):
            continue
        job_id, task, queue, outcome, duration = item
        if not (
            isinstance(job_id, str)
            and (task is None or isinstance(task, str))
            and (queue is None or isinstance(queue, str))
        ):
            continue
        if not (isinstance(outcome, str) and outcome in OUTCOMES):
            outcome = "unknown"
        if duration is None or (type(duration) is float and duration >= 0.0):
            jobs.append(make(FinishedJob, (job_id, task, queue, outcome, duration)))
            continue
        with contextlib.suppress(_Invalid):
            jobs.append(make(FinishedJob, (job_id, task, queue, outcome, _seconds(duration))))
    return tuple(jobs)


_NONE = type(None)
#: How a field is read off the wire, by its annotation: the exact types taken as they are, and
#: what converts any other value (or None: any other value is invalid). An annotation that is
#: not here fails at import, so the table cannot fall behind the dataclasses.
_READERS: Final[dict[str, tuple[frozenset[type], Callable[[Any], Any] | None]]] = {
    "str": (frozenset({str}), None),
    "str | None": (frozenset({str, _NONE}), None),
    "int | None": (frozenset({int, _NONE}), None),
    "bool": (frozenset({bool}), None),
    "Mapping[str, Any] | None": (frozenset({dict, _NONE}), None),
    "float | None": (frozenset({_NONE}), _seconds),
    "tuple[str, ...]": (frozenset(), _strings),
    "Mapping[str, float]": (frozenset(), _per_queue),
    "JobOutcome": (frozenset(), _job_outcome),
    "IdempotencyOutcome": (frozenset(), _idempotency_outcome),
    "tuple[FinishedJob, ...]": (frozenset(), _finished_jobs),
}

#: A field: its name, the types taken as they are, the converter, and the default (a factory;
#: None when the field is required).
_Field = tuple[str, frozenset[type], Callable[[Any], Any] | None, Callable[[], Any] | None]
_EVENT_CLASSES: Final[tuple[type[Event], ...]] = Event.__args__
_COMMAND_CLASSES: Final[tuple[type[CommandMessage], ...]] = CommandMessage.__args__


def _field(field: dataclasses.Field[Any]) -> _Field:
    default: Callable[[], Any] | None = None
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory
    elif field.default is not dataclasses.MISSING:
        default = functools.partial(_same, field.default)
    return (field.name, *_READERS[str(field.type)], default)


def _same(value: object) -> object:
    return value


def _set_slots_directly(cls: type[Any]) -> None:
    """Give an event class an ``__init__`` that sets its slots directly (same signature).

    The one dataclasses writes for a frozen class calls ``object.__setattr__`` per field, which
    doubles the cost of building an event: a worker builds two per job, the supervisor one per
    line it reads. Like dataclasses, it is compiled from the class's own field names.
    """
    scope: dict[str, Any] = {"FACTORY": _same}
    params, body = ["self"], []
    for f in dataclasses.fields(cls):
        scope[f"set_{f.name}"] = getattr(cls, f.name).__set__
        if f.default_factory is not dataclasses.MISSING:
            scope[f"new_{f.name}"] = f.default_factory
            params.append(f"{f.name}=FACTORY")
            body.append(f"if {f.name} is FACTORY: {f.name} = new_{f.name}()")
        elif f.default is not dataclasses.MISSING:
            scope[f"default_{f.name}"] = f.default
            params.append(f"{f.name}=default_{f.name}")
        else:
            params.append(f.name)
        body.append(f"set_{f.name}(self, {f.name})")
    source = f"def __init__({', '.join(params)}):\n    " + "\n    ".join(body)
    exec(source, scope)  # noqa: S102
    scope["__init__"].__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = scope["__init__"]


for _event_class in _EVENT_CLASSES:
    _set_slots_directly(_event_class)
del _event_class

_SCHEMAS: Final[dict[str, tuple[type[Any], tuple[_Field, ...]]]] = {
    cls.name: (cls, tuple(_field(f) for f in dataclasses.fields(cls))) for cls in _EVENT_CLASSES
}
_COMMANDS_BY_NAME: Final[dict[str, CommandMessage]] = {cls.name: cls() for cls in _COMMAND_CLASSES}
#: The fields an event writes after the envelope (``pid`` and ``ts`` are the envelope's).
_BODIES: Final[dict[type[Any], tuple[str, ...]]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("pid", "ts"))
    for cls in _EVENT_CLASSES
}
#: The envelope fields an event may set itself (a Hello's pid, a Heartbeat's ts).
_OWN_ENVELOPE: Final[dict[type[Any], tuple[str, ...]]] = {
    cls: names
    for cls in _EVENT_CLASSES
    if (names := tuple(f.name for f in dataclasses.fields(cls) if f.name in ("pid", "ts")))
}
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), default=str)
_ABSENT: Final = object()


def decode_message(message: object) -> Event | CommandMessage | BadMessage:
    """A wire message (a parsed JSON value) as a typed event or command, or why it is neither.

    Fields a type does not know are ignored (a newer sender may add some).
    """
    if not isinstance(message, dict):
        return BadMessage("not a JSON object")
    kind = message.get("type")
    schema = _SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        command = message.get("cmd")
        if isinstance(command, str) and command in _COMMANDS_BY_NAME:
            return _COMMANDS_BY_NAME[command]
        return BadMessage(f"unknown event type {str(kind)[:64]!r}")
    cls, fields = schema
    values = []
    for name, exact, convert, default in fields:
        value = message.get(name, _ABSENT)
        if type(value) in exact:
            values.append(value)
        elif value is _ABSENT:
            if default is None:
                return BadMessage(f"{kind}: {name} is missing")
            values.append(default())
        elif convert is None:
            return BadMessage(f"{kind}: {name} has the wrong type")
        else:
            try:
                values.append(convert(value))
            except _Invalid as exc:
                return BadMessage(f"{kind}: {name} is {exc}")
    event: Event = cls(*values)
    return event


def decode(line: bytes | str) -> Event | CommandMessage | BadMessage:
    """One line of the channel as a typed event or command, or a :class:`BadMessage`."""
    try:
        message = json.loads(line)
    except ValueError:
        return BadMessage("not JSON")
    return decode_message(message)


def _line(message: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(message).encode() + b"\n"


def encode(
    item: Event | CommandMessage, *, pid: int | None = None, ts: float | None = None
) -> bytes:
    """One event or command as one line: ``{"type", "pid", "ts", ...fields}`` or ``{"cmd"}``.

    An event's ``pid`` and ``ts`` default to this process and now (a :class:`Hello`'s own pid
    and a :class:`Heartbeat`'s own ts, when set, win). The bytes are what a sender writes with
    ``EventClient.send(name, **fields)`` and the same fields in the dataclass's order.
    """
    body = _BODIES.get(type(item))
    if body is None:
        return _line({"cmd": item.name})
    message = {
        "type": item.name,
        "pid": os.getpid() if pid is None else pid,
        "ts": time.time() if ts is None else ts,
    }
    for name in _OWN_ENVELOPE.get(type(item), ()):
        if (own := getattr(item, name)) is not None:
            message[name] = own
    for name in body:
        message[name] = getattr(item, name)
    return _line(message)


#: An event not yet written, and the wall time it was sent at.
Pending = tuple[Event, float]


def encode_batch(pid: int, batch: list[Pending]) -> bytes:
    """A batch's lines (as :func:`encode` writes each), consecutive finishes as one line.

    Consecutive :class:`JobFinished` become one :class:`JobsFinished`; a :class:`JobStarted`
    whose job succeeds later in the batch is left out (the supervisor would add the delivery to
    those in flight and remove it at once). Only *consecutive* finishes merge, so a job
    finished, requeued and started again within one batch still reads in that order.
    """
    lines: list[bytes] = []
    done: set[str] = set()  # the jobs that succeeded later in the batch
    finished: list[list[Any]] = []  # JobsFinished.jobs as written: a list per job
    for event, ts in reversed(batch):  # one pass, from the end: a start knows what follows
        if type(event) is JobFinished:
            if event.outcome == "succeeded":
                done.add(event.job_id)
            finished.append([event.job_id, event.task, event.queue, event.outcome, event.duration])
            continue
        if type(event) is JobStarted and event.job_id in done:
            continue
        if finished:
            lines.append(_jobs_finished(pid, finished))
            finished = []
        lines.append(encode(event, pid=pid, ts=ts))
    if finished:
        lines.append(_jobs_finished(pid, finished))
    lines.reverse()
    return b"".join(lines)


def _jobs_finished(pid: int, reversed_jobs: list[list[Any]]) -> bytes:
    reversed_jobs.reverse()
    return _line({"type": "jobs_finished", "pid": pid, "ts": time.time(), "jobs": reversed_jobs})


# --- the client ---------------------------------------------------------------------------------


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
        self.send(Hello(self.role))

    def on_command(self, handler: Callable[[Command, Message], None]) -> None:
        """Call ``handler(command, message)`` for every command the supervisor sends."""
        self._handlers.append(handler)

    @overload
    def send(self, event: Event) -> None: ...
    @overload
    def send(self, event: EventType, **fields: Any) -> None: ...
    def send(self, event: Event | EventType, **fields: Any) -> None:
        """Send one event, typed or as a name and its fields (the same bytes either way).

        Drops it (warning once) when the supervisor cannot be reached.
        """
        sock = self._sock
        if sock is None:
            return
        if isinstance(event, str):
            data = _line({"type": event, "pid": self.pid, "ts": time.time(), **fields})
        else:
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
                if isinstance(command, _COMMAND_CLASSES):
                    self._dispatch(command)

    def _dispatch(self, command: CommandMessage) -> None:
        for handler in list(self._handlers):
            try:
                handler(command.name, {"cmd": command.name})
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
