"""Structured logging: one JSON object (or one readable line) per record, with an event."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from workerkit.logs import configure_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


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
