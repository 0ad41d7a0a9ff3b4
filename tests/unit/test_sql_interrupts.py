"""The sql worker's interrupt gate: an interrupt lands only while the job's body runs."""

from __future__ import annotations

import threading
import time

import pytest

from workerkit.engines.sql.interrupts import Gate


class Stop(BaseException):
    pass


def test_an_interrupt_asked_for_before_the_body_is_raised_as_it_begins() -> None:
    gate = Gate()
    assert gate.interrupt(Stop)
    ran = False
    with pytest.raises(Stop), gate:
        ran = True
    assert not ran


def test_an_interrupt_after_the_body_is_not_sent_and_only_one_is_ever_sent() -> None:
    gate = Gate()
    with gate:
        pass
    assert not gate.interrupt(Stop)
    other = Gate()
    assert other.interrupt(Stop)
    assert not other.interrupt(Stop)
    with pytest.raises(Stop), other:
        pass


def test_an_interrupt_lands_in_the_running_body_of_another_thread() -> None:
    gate = Gate()
    inside, landed = threading.Event(), threading.Event()

    def job() -> None:
        try:
            with gate:
                inside.set()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    time.sleep(0.01)
        except Stop:
            landed.set()

    thread = threading.Thread(target=job)
    thread.start()
    assert inside.wait(10)
    assert gate.interrupt(Stop)
    thread.join(10)
    assert landed.is_set()
