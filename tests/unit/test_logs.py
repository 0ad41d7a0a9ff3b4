"""Structured logging: one JSON object (or one readable line) per record, with an event."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import random
import sys
import threading
import warnings
from collections.abc import Iterator

import pytest

from workerkit.logs import _timestamp, configure_logging, route_logger


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = sys.excepthook, threading.excepthook
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
        sys.excepthook, threading.excepthook = hooks


@pytest.mark.usefixtures("restore_root")
def test_json_lines_carry_event_and_extra_fields() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    logging.getLogger("workerkit.test").info(
        "drain %s", "started", extra={"event": "drain_started", "in_flight": 2}
    )
    logging.getLogger("workerkit.test").debug("hidden", extra={"event": "hidden"})
    (line,) = stream.getvalue().splitlines()
    data = json.loads(line)
    assert data["event"] == "drain_started"
    assert data["message"] == "drain started"
    assert data["level"] == "info"
    assert data["logger"] == "workerkit.test"
    assert data["in_flight"] == 2
    assert data["ts"].endswith("Z")


@pytest.mark.usefixtures("restore_root")
def test_json_without_event_and_with_exception() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed")
    data = json.loads(stream.getvalue())
    assert data["event"] == "log"
    assert "ValueError: boom" in data["exception"]


@pytest.mark.usefixtures("restore_root")
def test_text_lines_are_readable() -> None:
    stream = io.StringIO()
    configure_logging("info", "text", stream=stream)
    logging.getLogger("workerkit.supervisor").warning(
        "second signal", extra={"event": "signal_ignored", "signal": "SIGTERM"}
    )
    line = stream.getvalue().strip()
    assert " WARNING workerkit.supervisor signal_ignored: second signal" in line
    assert line.endswith('signal="SIGTERM"')


@pytest.mark.usefixtures("restore_root")
def test_configuring_twice_replaces_only_our_handler() -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=first)
    configure_logging("info", "json", stream=second)
    assert len(root.handlers) == before + 1
    logging.getLogger("y").info("once", extra={"event": "once"})
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("restore_root")
def test_json_mode_turns_warnings_and_uncaught_exceptions_into_records() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("mind the gap", UserWarning, stacklevel=1)
    try:
        raise RuntimeError("nobody caught me")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
    thread.start()
    thread.join()
    warned, main, in_thread = _records(stream)  # every line is one JSON object
    assert warned["logger"] == "py.warnings"
    assert "UserWarning: mind the gap" in str(warned["message"])
    assert main["event"] == "uncaught_exception"
    assert "RuntimeError: nobody caught me" in str(main["exception"])
    assert (in_thread["event"], in_thread["thread_name"]) == ("uncaught_exception", "doomed")
    assert "ZeroDivisionError" in str(in_thread["exception"])


@pytest.mark.usefixtures("restore_root")
def test_text_mode_leaves_warnings_and_exceptions_to_python() -> None:
    configure_logging("info", "json", stream=io.StringIO())
    configure_logging("info", "text", stream=io.StringIO())
    assert sys.excepthook is sys.__excepthook__
    assert threading.excepthook is threading.__excepthook__
    assert warnings.showwarning.__module__ != "logging"


@pytest.mark.usefixtures("restore_root")
def test_a_routed_logger_writes_through_our_handler_only_also_after_reconfiguring() -> None:
    own = io.StringIO()
    library = logging.getLogger("test_logs.library")
    library.addHandler(logging.StreamHandler(own))
    library.propagate = False
    try:
        first = io.StringIO()
        configure_logging("info", "json", stream=first)
        route_logger("test_logs.library", level=logging.ERROR)
        library.warning("below the routed level")
        library.error("routed", extra={"event": "routed"})
        library.propagate = False  # what billiard does each time it rebuilds its logger
        second = io.StringIO()
        configure_logging("info", "json", stream=second)
        library.error("again")
    finally:
        for handler in list(library.handlers):
            library.removeHandler(handler)
    assert own.getvalue() == ""
    assert [r["message"] for r in _records(first)] == ["routed"]
    assert [r["message"] for r in _records(second)] == ["again"]


def _reference_timestamp(created: float) -> str:
    moment = dt.datetime.fromtimestamp(created, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def test_timestamps_are_what_datetime_writes_at_every_rounding_edge() -> None:
    """The timestamp reuses the second's text (a worker logs a few lines per job): every value
    must still read as ``datetime.fromtimestamp`` rounds it, across seconds and at the edges
    (half a microsecond, the last microsecond of a second), also for several lines in one
    second and out of order."""
    chooser = random.Random(16)
    values = [0.0, 0.5, 1.9999995, 1.9999994, -0.25, -1.0000004, 1751343505.3989995]
    for _ in range(20000):
        whole = chooser.randrange(1_600_000_000, 1_900_000_000)
        values.append(whole + chooser.random())
        values.append(whole + chooser.choice([0.0005, 0.0004999, 0.9999995, 0.9999996, 0.0]))
        values.append(whole + chooser.random())  # the same second again: its text reused
    for value in values:
        assert _timestamp(value) == _reference_timestamp(value), repr(value)
