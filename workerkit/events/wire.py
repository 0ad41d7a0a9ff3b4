"""The wire form of the event channel: one JSON object a line, decoded and encoded here only.

:func:`decode` is the one place a line is validated: into a typed event or command, or a
:class:`BadMessage`, never an exception. :func:`encode_batch` is what a batching sender writes.
A command is ``{"cmd": NAME}`` plus its fields, if it has any (``presence``: the record).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from workerkit.engines.presence import PRESENCE_STATES, Presence
from workerkit.events.messages import (
    IDEMPOTENCY_OUTCOMES,
    OUTCOMES,
    PAYLOAD_REFUSALS,
    SCHEDULE_FIRE_OUTCOMES,
    BadMessage,
    CommandMessage,
    Event,
    FinishedJob,
    IdempotencyOutcome,
    JobFinished,
    JobOutcome,
    JobStarted,
    PayloadRefusal,
    PublishPresence,
    Release,
    RequestStop,
    ScheduleFireOutcome,
)

__all__ = ("Pending", "decode", "decode_message", "encode", "encode_batch", "encode_line")


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


def _payload_refusal(value: object) -> PayloadRefusal:
    if isinstance(value, str) and value in PAYLOAD_REFUSALS:
        return value  # type: ignore[return-value]
    raise _Invalid("not a payload refusal")


def _fire_outcome(value: object) -> ScheduleFireOutcome:
    if isinstance(value, str) and value in SCHEDULE_FIRE_OUTCOMES:
        return value  # type: ignore[return-value]
    return "unknown"  # a label set must stay bounded whatever a process sends


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
    "PayloadRefusal": (frozenset(), _payload_refusal),
    "ScheduleFireOutcome": (frozenset(), _fire_outcome),
    "tuple[FinishedJob, ...]": (frozenset(), _finished_jobs),
}

#: A field: its name, the types taken as they are, the converter, and the default (a factory;
#: None when the field is required).
_Field = tuple[str, frozenset[type], Callable[[Any], Any] | None, Callable[[], Any] | None]
_EVENT_CLASSES: Final[tuple[type[Event], ...]] = Event.__args__


def _field(field: dataclasses.Field[Any]) -> _Field:
    default: Callable[[], Any] | None = None
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory
    elif field.default is not dataclasses.MISSING:
        default = functools.partial(_same, field.default)
    return (field.name, *_READERS[str(field.type)], default)


def _same(value: object) -> object:
    return value


_SCHEMAS: Final[dict[str, tuple[type[Any], tuple[_Field, ...]]]] = {
    cls.name: (cls, tuple(_field(f) for f in dataclasses.fields(cls))) for cls in _EVENT_CLASSES
}
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
        read = _COMMAND_READERS.get(command) if isinstance(command, str) else None
        if read is not None:
            return read(message)
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


# --- commands ------------------------------------------------------------------------------------


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid("not a number")
    return float(value)


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("not an integer")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid("not a string")
    return value


def _state(value: object) -> str:
    if isinstance(value, str) and value in PRESENCE_STATES:
        return value
    raise _Invalid(f"not one of {', '.join(PRESENCE_STATES)}")


def _optional_number(value: object) -> float | None:
    return None if value is None else _number(value)


def _counts(value: object) -> dict[str, dict[str, int]]:
    if not isinstance(value, dict):
        raise _Invalid("not an object")
    counts: dict[str, dict[str, int]] = {}
    for queue, outcomes in value.items():
        if not isinstance(outcomes, dict):
            raise _Invalid("not an object of objects")
        counts[queue] = {outcome: _integer(n) for outcome, n in outcomes.items()}
    return counts


#: A presence record's fields: how each is read, and its default (None: required).
_PRESENCE_FIELDS: Final[tuple[tuple[str, Callable[[Any], Any], Callable[[], Any] | None], ...]] = (
    ("worker_id", _text, None),
    ("hostname", _text, None),
    ("pid", _integer, None),
    ("engine", _text, None),
    ("queues", _strings, None),
    ("concurrency", _integer, None),
    ("state", _state, None),
    ("started_at", _number, None),
    ("heartbeat_at", _number, None),
    ("ttl", _number, None),
    ("drain_deadline", _optional_number, functools.partial(_same, None)),
    ("hard_deadline", _optional_number, functools.partial(_same, None)),
    ("jobs", _strings, tuple),
    ("counts", _counts, dict),
)


def _publish_presence(message: dict[str, Any]) -> PublishPresence | BadMessage:
    record = message.get("presence")
    if not isinstance(record, dict):
        return BadMessage("presence: presence is not an object")
    values: dict[str, Any] = {}
    for name, read, default in _PRESENCE_FIELDS:
        if name not in record:
            if default is None:
                return BadMessage(f"presence: {name} is missing")
            values[name] = default()
            continue
        try:
            values[name] = read(record[name])
        except _Invalid as exc:
            return BadMessage(f"presence: {name} is {exc}")
    return PublishPresence(Presence(**values))


def _singleton(command: CommandMessage) -> Callable[[dict[str, Any]], CommandMessage]:
    """The reader of a command without fields: always the same instance."""
    return lambda message: command


#: How each command is read off the wire; fields a command does not know are ignored.
_COMMAND_READERS: Final[dict[str, Callable[[dict[str, Any]], CommandMessage | BadMessage]]] = {
    RequestStop.name: _singleton(RequestStop()),
    Release.name: _singleton(Release()),
    PublishPresence.name: _publish_presence,
}


def decode(line: bytes | str) -> Event | CommandMessage | BadMessage:
    """One line of the channel as a typed event or command, or a :class:`BadMessage`."""
    try:
        message = json.loads(line)
    except ValueError:
        return BadMessage("not JSON")
    return decode_message(message)


def encode_line(message: Mapping[str, Any]) -> bytes:
    """One JSON object as one line of the channel."""
    return _ENCODER.encode(message).encode() + b"\n"


def encode(
    item: Event | CommandMessage, *, pid: int | None = None, ts: float | None = None
) -> bytes:
    """One event or command as one line: ``{"type", "pid", "ts", ...fields}`` or ``{"cmd"}``.

    An event's ``pid`` and ``ts`` default to this process and now (a :class:`Hello`'s own pid
    and a :class:`Heartbeat`'s own ts, when set, win); the fields follow in the dataclass's order.
    """
    body = _BODIES.get(type(item))
    if body is None:
        if type(item) is PublishPresence:
            return encode_line({"cmd": item.name, "presence": dataclasses.asdict(item.presence)})
        return encode_line({"cmd": item.name})
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
    return encode_line(message)


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
    return encode_line(
        {"type": "jobs_finished", "pid": pid, "ts": time.time(), "jobs": reversed_jobs}
    )
