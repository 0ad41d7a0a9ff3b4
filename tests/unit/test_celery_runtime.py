"""The Celery engine's per-process Runtime: what a forked pool child keeps and what it drops."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery
from celery.worker import state

from workerkit.engines.celery.lease import now
from workerkit.engines.celery.runtime import Runtime
from workerkit.engines.celery.task import request_class
from workerkit.events import BatchingSender
from workerkit.settings import Settings


def test_a_forked_child_drops_the_parents_event_sender_and_keeps_the_rest() -> None:
    settings = Settings(engine="celery")
    runtime = Runtime(Celery("t"), settings)
    parent_events = runtime.open_task_events()
    assert runtime.open_task_events() is parent_events  # one per process
    runtime.stop_requested.set()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        ok = (
            runtime.task_events is None
            and isinstance(runtime.open_task_events(), BatchingSender)
            and runtime.task_events is not parent_events
            and runtime.task_events.pid == os.getpid()
            and runtime.stop_requested.is_set()  # a stop asked before the fork still holds
            and runtime.settings is settings
        )
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert runtime.task_events is parent_events  # the parent keeps its own


class FakeLedger:
    """Stands in for the Redis ledger: the tags whose lease another worker holds."""

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.acked: set[str] = set()
        self.renewed: list[list[str]] = []
        #: Runs inside ack(), after the script: the keeper's round in that instant.
        self.during_ack: Callable[[], None] = lambda: None

    def renew_leases(self, tags: list[str], owner: str, ttl: float) -> list[str]:
        self.renewed.append(list(tags))
        return [tag for tag in tags if tag in self.taken or tag in self.acked]

    def ack(self, tag: str, owner: str) -> bool:
        self.acked.add(tag)  # gone from ``unacked``: a renewal now finds it lost
        self.during_ack()
        return True


def _request(tag: str) -> SimpleNamespace:
    message = SimpleNamespace(delivery_tag=tag, channel=None)
    return SimpleNamespace(id=f"job-{tag}", message=message, acknowledged=False, eta=None)


def test_the_pool_deadline_advances_only_while_no_lease_in_hand_is_lost() -> None:
    runtime = Runtime(Celery("t"), Settings(engine="celery", recovery_window=30))
    ledger = FakeLedger()
    runtime._ledger = ledger  # type: ignore[assignment]
    running, waiting = _request("a"), _request("b")
    running._workerkit_dispatched = True  # given to the pool; "b" waits for its ETA
    for request in (running, waiting):
        runtime.hold(request)
    runtime.lease.extend(now() - 10)  # the last good round was 10 s ago: 5 s left
    runtime._renew_leases()
    assert 14.5 < (runtime.lease.left() or 0) <= 15.0  # W/2 from this round
    ledger.taken = {"a", "b"}  # both restored by another worker while this one was stopped
    runtime.lease.extend(now() - 10)
    runtime._renew_leases()
    assert waiting.acknowledged  # never started here: dropped, it will not run
    assert running._workerkit_lost
    assert not running.acknowledged
    assert (runtime.lease.left() or 0) < 5.5  # not advanced: the child's watchdog stops it
    runtime._renew_leases()
    assert ledger.renewed[-1] == []  # a lost lease is never renewed (taken back) again
    assert (runtime.lease.left() or 0) < 5.5
    runtime.forget(running)  # its (fenced) settle came
    runtime._renew_leases()
    assert (runtime.lease.left() or 0) > 14.5


def test_a_lost_message_never_settled_stops_freezing_the_deadline_once_it_passed() -> None:
    # Celery gives up a late ack after a broker connection loss: the lost request is never
    # settled. Frozen for good, the deadline would stop every later run of this worker at once.
    runtime = Runtime(Celery("t"), Settings(engine="celery", recovery_window=30))
    ledger = FakeLedger()
    runtime._ledger = ledger  # type: ignore[assignment]
    orphan = _request("a")
    orphan._workerkit_dispatched = True
    runtime.hold(orphan)
    ledger.taken = {"a"}
    runtime.lease.extend(now() - 10)
    runtime._renew_leases()
    assert orphan._workerkit_lost
    assert (runtime.lease.left() or 0) < 5.5  # frozen while its run may go on
    runtime.lease.extend(now() - 16)  # the frozen deadline passed: every run of it was killed
    again = _request("a")  # the same message delivered here again meanwhile (the same tag)
    runtime._renew_leases()
    assert runtime._in_hand() == []
    assert (runtime.lease.left() or 0) > 14.5
    runtime.hold(again)
    runtime.forget(orphan)  # a late settle of the old run leaves the new delivery in hand
    assert runtime._in_hand() == [again]


def test_a_pool_child_forked_earlier_sees_the_deadline_its_parent_writes_later() -> None:
    runtime = Runtime(Celery("t"), Settings(engine="celery", recovery_window=30))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child waits for the parent's renewal, then reads the shared deadline
        os.close(write)
        os.read(read, 1)
        left = runtime.lease.left()
        os._exit(0 if left is not None and 14.0 < left <= 15.0 else 1)
    os.close(read)
    runtime.lease.extend(now())
    os.write(write, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


class _Request:
    """A Celery Request as the runtime sees it (hashable and weak-referenceable, as Celery's
    state sets need)."""

    def __init__(self, tag: str) -> None:
        self.id = f"job-{tag}"
        self.message = SimpleNamespace(delivery_tag=tag, channel=None)
        self.acknowledged = False
        self.eta = None


class _Entry:
    """kombu's timer entry."""

    canceled = False

    def cancel(self) -> None:
        self.canceled = True


class _Consumer:
    """Celery's consumer: its loop's hub (call_soon) and its prefetch QoS."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []
        self.decrements = 0
        self.dispatched: list[Any] = []
        self.controller = SimpleNamespace(hub=SimpleNamespace(call_soon=self.calls.append))
        self.qos = SimpleNamespace(decrement_eventually=self._decrement)
        self.on_task_request = self.dispatched.append

    def _decrement(self) -> None:
        self.decrements += 1


def test_a_lost_lease_is_dropped_on_the_loop_thread_and_gives_its_prefetch_slot_back() -> None:
    runtime = Runtime(Celery("t"), Settings(engine="celery", recovery_window=30))
    ledger = FakeLedger()
    runtime._ledger = ledger  # type: ignore[assignment]
    consumer = _Consumer()
    runtime.attach(consumer)
    waiting = _Request("b")  # waits for its ETA: Celery raised the prefetch count for it
    entry = waiting._eta_timer_entry = _Entry()
    state.task_scheduled(waiting)
    runtime.hold(waiting)
    ledger.taken = {"b"}
    runtime._renew_leases()  # the keeper's thread: Celery's and kombu's state are not its
    assert not waiting.acknowledged
    assert waiting in state.scheduled_requests
    assert not entry.canceled
    assert len(consumer.calls) == 1
    consumer.calls.pop()()  # the loop runs the drop
    assert waiting.acknowledged
    assert entry.canceled
    assert waiting not in state.scheduled_requests
    assert consumer.decrements == 1  # the slot its timer would have given back
    assert runtime._in_hand() == []
    runtime._drop(waiting)  # dropped twice (the keeper, then its ETA's gate): one slot back
    assert consumer.decrements == 1
    # A lost message whose ETA came (the timer fired): the gate drops it; Celery's
    # apply_eta_task gives its slot back itself.
    fired = _Request("c")
    fired._workerkit_lost = True
    runtime.hold(fired)
    state.task_reserved(fired)
    consumer.on_task_request(fired)
    assert fired.acknowledged
    assert consumer.dispatched == []
    assert consumer.decrements == 1
    state.task_ready(fired)


class _CeleryRequest:
    """The part of Celery's Request the workerkit mixin uses."""

    def __init__(self, tag: str) -> None:
        self.id = f"job-{tag}"
        self.type = "t"
        self.message = SimpleNamespace(delivery_tag=tag, channel=None)
        self.acknowledged = False
        self.time_limits = (None, None)
        self.eta = None

    def acknowledge(self) -> None:
        raise AssertionError("kombu's unfenced ack")


def test_a_renewal_that_runs_while_the_loop_acknowledges_is_not_a_lost_lease(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = Runtime(Celery("t"), Settings(engine="celery", recovery_window=30))
    ledger = FakeLedger()
    runtime._ledger = ledger  # type: ignore[assignment]
    request = request_class(_CeleryRequest, runtime)("a")
    request._workerkit_dispatched = True
    runtime.lease.extend(now() - 10)  # the last round was 10 s ago: 5 s left
    ledger.during_ack = runtime._renew_leases  # the keeper's round, right after ack.lua
    with caplog.at_level(logging.WARNING, logger="workerkit.engines.celery"):
        request.acknowledge()
    assert request.acknowledged
    assert not getattr(request, "_workerkit_lost", False)
    assert not [r for r in caplog.records if getattr(r, "event", None) == "lease_lost"]
    assert (runtime.lease.left() or 0) > 14.5  # the round still advanced the deadline
    assert runtime._in_hand() == []


class _Job:
    """billiard's ApplyResult as the pool's cache holds it."""

    def __init__(self, number: int) -> None:
        self._job = number


class _PoolConsumer(_Consumer):
    """A consumer with a prefork pool: one child, and the pool's cache of jobs."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[int, _Job] = {}
        asyn = SimpleNamespace(_pool=[SimpleNamespace(pid=os.getpid())], _cache=self.cache)
        self.pool = SimpleNamespace(_pool=asyn)
        self.task_consumer = SimpleNamespace(channel=None)


class _RestoringLedger(FakeLedger):
    def __init__(self) -> None:
        super().__init__()
        self.restored: list[str] = []

    def restore(self, tag: str, *, owners: tuple[str, ...] = ()) -> bool:
        self.restored.append(tag)
        return True


def test_after_a_reconnection_only_what_celery_dropped_unstarted_goes_back() -> None:
    runtime = Runtime(Celery("t"), Settings(engine="celery", recovery_window=30))
    ledger = _RestoringLedger()
    runtime._ledger = ledger  # type: ignore[assignment]
    consumer = _PoolConsumer()
    runtime.attach(consumer)
    running, written, dropped, waiting = (_Request(t) for t in "abcd")
    for request in (running, written, dropped):
        request._workerkit_dispatched = True
    job = _Job(1)
    consumer.cache[1] = job  # in a child's pipe, not acknowledged by the child yet
    written._apply_result = lambda: job
    dropped._apply_result = lambda: _Job(2)  # never written: Celery's flush discarded it
    for request in (running, written, dropped, waiting):
        runtime.hold(request)
    state.active_requests.add(running)  # a child accepted it: it runs
    try:
        runtime.on_consumer_start(consumer)  # the first start
        assert ledger.restored == []
        runtime.on_consumer_start(consumer)  # after a lost connection
    finally:
        state.active_requests.discard(running)
    assert sorted(ledger.restored) == ["c", "d"]
    assert runtime._in_hand() == [running, written]  # their leases renewed until they settle
    again = _Request("c")  # the same message delivered here again: held, as any delivery
    runtime.hold(again)
    assert again in runtime._in_hand()


def test_new_work_waits_while_the_shared_deadline_is_stale() -> None:
    # Just after SIGCONT (or a failed renewal round) the deadline the pool children read is
    # stale: a task given to the pool now would be stopped at once by its watchdog.
    runtime = Runtime(Celery("t"), Settings(engine="celery", recovery_window=30))
    ledger = FakeLedger()
    runtime._ledger = ledger  # type: ignore[assignment]
    consumer = _PoolConsumer()
    runtime.attach(consumer)
    runtime.lease.extend(now() - 14)  # 1 s left of 15: under W/8
    fresh = _Request("a")
    runtime.hold(fresh)
    consumer.on_task_request(fresh)
    assert consumer.dispatched == []
    runtime._renew_leases()  # the next round renews every lease in hand
    assert (runtime.lease.left() or 0) > 14.5
    consumer.calls.pop()()  # on the loop thread
    assert consumer.dispatched == [fresh]
    assert fresh._workerkit_dispatched
