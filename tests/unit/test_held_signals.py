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
