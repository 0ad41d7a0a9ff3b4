"""Signals that arrive before the supervisor listens are recorded, in order, and taken once."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from workerkit.supervisor import held_signals


@pytest.fixture
def restored() -> Iterator[None]:
    before = {signum: signal.getsignal(signum) for signum in held_signals.SIGNALS}
    try:
        yield
    finally:
        held_signals.take()
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_signals_before_the_loop_are_recorded_in_order_and_taken_once(restored: None) -> None:
    held_signals.hold()
    os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before kill returns
    os.kill(os.getpid(), signal.SIGINT)  # held: no KeyboardInterrupt
    assert held_signals.take() == [signal.SIGTERM, signal.SIGINT]
    assert held_signals.take() == []


def test_first_shows_the_oldest_signal_and_leaves_it_to_take(restored: None) -> None:
    """The CLI's wait for the app check looks with :func:`held_signals.first` (a SIGTERM ends
    it); the signals stay recorded for the supervisor, whichever way the start goes on."""
    held_signals.hold()
    assert held_signals.first() is None
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGTERM)
    assert held_signals.first() == signal.SIGHUP
    assert held_signals.take() == [signal.SIGHUP, signal.SIGTERM]
    assert held_signals.first() is None
