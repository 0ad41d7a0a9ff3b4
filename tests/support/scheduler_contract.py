"""The scheduler store contract suite: one set of tests every SchedulerStore must pass.

Each store's test file subclasses :class:`SchedulerStoreContract` and provides two fixtures:

``store``
    A fresh :class:`~workerkit.scheduler.contract.SchedulerStore` on an empty store.
``enqueued``
    A callable returning what the store has enqueued so far as :class:`Enqueued` values
    (read back from the queue the way the engine stores jobs), in any order.

Optional overrides: the ``pass_time`` fixture (a callable that returns once the store's clock
has moved on by at least the given seconds; default: wait on the real clock) and
:meth:`SchedulerStoreContract.make_schedule` (schedules the engine can enqueue). A store that
cannot honour a test (e.g. Redis prunes by TTL) overrides that test with a skip and says why.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from workerkit.scheduler.contract import (
    FireOutcome,
    Lease,
    Schedule,
    SchedulerStore,
    fire_job_id,
    fire_key,
)
from workerkit.scheduler.triggers import Every

__all__ = ("Enqueued", "SchedulerStoreContract")

SHORT_LEASE = 0.4  # seconds: leases that tests let expire on the store's clock
LONG_LEASE = 60.0  # seconds: leases that must not expire during a test, however slow


@dataclass(frozen=True)
class Enqueued:
    """One enqueued job as the contract compares it (read back from the engine's queue)."""

    job_id: str
    schedule: str
    fire_time: float
    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None


class SchedulerStoreContract:
    """The tests; subclass with ``store`` and ``enqueued`` fixtures (see the module docstring)."""

    T0 = 1_800_000_000.0  # a fire time well away from "now": fire times are just numbers

    def make_schedule(self, name: str = "tick", *, every: float = 1.0, **kw: Any) -> Schedule:
        """A schedule this store can enqueue (override for an engine that needs more)."""
        kw.setdefault("task", "tests.apps.scheduled.tick")
        kw.setdefault("queue", "default")
        kw.setdefault("args", (1, "a"))
        kw.setdefault("kwargs", {"k": 2})
        return Schedule(name=name, trigger=Every(every), **kw)

    @pytest.fixture
    def pass_time(self, store: SchedulerStore) -> Callable[[float], None]:
        """Return once the store's clock has moved ``seconds`` past the call."""

        def wait(seconds: float) -> None:
            target = store.clock() + seconds
            deadline = time.monotonic() + 10 * seconds + 5
            while store.clock() <= target:
                assert time.monotonic() < deadline, "the store's clock did not move on"
                time.sleep(min(0.05, seconds))

        return wait

    def leading(self, store: SchedulerStore, *schedules: Schedule, holder: str = "a") -> Lease:
        lease = store.acquire(holder, LONG_LEASE)
        assert lease is not None
        assert store.register(lease, schedules)
        return lease

    # -- leadership -------------------------------------------------------------------------

    def test_acquire_when_nobody_leads_and_leader_shows_it(self, store: SchedulerStore) -> None:
        assert store.leader() is None
        lease = store.acquire("a", LONG_LEASE)
        assert lease is not None
        assert lease.holder == "a"
        info = store.leader()
        assert info is not None
        assert (info.holder, info.epoch) == ("a", lease.epoch)
        assert 0 < info.expires_in <= LONG_LEASE + 1

    def test_a_second_holder_cannot_acquire_a_live_lease(self, store: SchedulerStore) -> None:
        assert store.acquire("a", LONG_LEASE) is not None
        assert store.acquire("b", LONG_LEASE) is None

    def test_the_holder_acquiring_again_keeps_its_epoch(self, store: SchedulerStore) -> None:
        first = store.acquire("a", LONG_LEASE)
        again = store.acquire("a", LONG_LEASE)
        assert first is not None
        assert again is not None
        assert again.epoch == first.epoch

    def test_release_lets_another_holder_take_over_with_a_higher_epoch(
        self, store: SchedulerStore
    ) -> None:
        first = store.acquire("a", LONG_LEASE)
        assert first is not None
        store.release(first)
        assert store.leader() is None
        second = store.acquire("b", LONG_LEASE)
        assert second is not None
        assert second.epoch > first.epoch

    def test_renew_extends_and_a_replaced_lease_cannot_renew(self, store: SchedulerStore) -> None:
        first = store.acquire("a", LONG_LEASE)
        assert first is not None
        renewed = store.renew(first, LONG_LEASE)
        assert renewed is not None
        assert renewed.epoch == first.epoch
        store.release(renewed)
        assert store.acquire("b", LONG_LEASE) is not None
        assert store.renew(first, LONG_LEASE) is None
        info = store.leader()
        assert info is not None
        assert info.holder == "b"

    def test_releasing_a_replaced_lease_leaves_the_new_leader(self, store: SchedulerStore) -> None:
        first = store.acquire("a", LONG_LEASE)
        assert first is not None
        store.release(first)
        second = store.acquire("b", LONG_LEASE)
        assert second is not None
        store.release(first)  # late, from the old leader: a no-op
        info = store.leader()
        assert info is not None
        assert info.holder == "b"

    def test_an_expired_lease_goes_to_another_holder_with_a_higher_epoch(
        self, store: SchedulerStore, pass_time: Callable[[float], None]
    ) -> None:
        first = store.acquire("a", SHORT_LEASE)
        assert first is not None
        pass_time(SHORT_LEASE + 0.1)
        assert store.leader() is None
        second = store.acquire("b", LONG_LEASE)
        assert second is not None
        assert second.epoch > first.epoch
        assert store.renew(first, LONG_LEASE) is None

    # -- registration and firing ------------------------------------------------------------

    def test_register_stores_fingerprints_only_for_the_live_lease(
        self, store: SchedulerStore
    ) -> None:
        schedule = self.make_schedule()
        first = store.acquire("a", LONG_LEASE)
        assert first is not None
        store.release(first)
        assert store.acquire("b", LONG_LEASE) is not None
        assert store.register(first, [schedule]) is False
        assert store.states() == {}

    def test_the_leader_fires_once_and_the_job_carries_the_fire(
        self, store: SchedulerStore, enqueued: Callable[[], list[Enqueued]]
    ) -> None:
        schedule = self.make_schedule()
        lease = self.leading(store, schedule)
        state = store.states()["tick"]
        assert (state.fingerprint, state.paused, state.last_fire) == (
            schedule.fingerprint(),
            False,
            None,
        )
        assert store.fire(schedule, self.T0, epoch=lease.epoch, reason="on_time") == "fired"
        assert store.fire(schedule, self.T0, epoch=lease.epoch, reason="on_time") == (
            FireOutcome.ALREADY_FIRED
        )
        assert store.fire(schedule, self.T0, epoch=None, reason="standby") == (
            FireOutcome.ALREADY_FIRED
        )
        jobs = enqueued()
        assert len(jobs) == 1
        job = jobs[0]
        assert job.job_id == fire_job_id("tick", self.T0)
        assert (job.schedule, fire_key(job.fire_time), job.task) == (
            "tick",
            fire_key(self.T0),
            schedule.task,
        )
        assert (tuple(job.args), dict(job.kwargs), job.queue) == ((1, "a"), {"k": 2}, "default")
        last = store.states(["tick"])["tick"].last_fire
        assert last is not None
        assert (fire_key(last.fire_time), last.job_id, last.reason) == (
            fire_key(self.T0),
            job.job_id,
            "on_time",
        )

    def test_fire_times_within_a_millisecond_are_the_same_fire(
        self, store: SchedulerStore, enqueued: Callable[[], list[Enqueued]]
    ) -> None:
        schedule = self.make_schedule()
        lease = self.leading(store, schedule)
        assert store.fire(schedule, self.T0, epoch=lease.epoch, reason="on_time") == "fired"
        again = store.fire(schedule, self.T0 + 0.0002, epoch=None, reason="standby")
        assert again == FireOutcome.ALREADY_FIRED
        assert len(enqueued()) == 1

    def test_a_standby_fires_an_unrecorded_time_without_the_lease(
        self, store: SchedulerStore, enqueued: Callable[[], list[Enqueued]]
    ) -> None:
        schedule = self.make_schedule()
        self.leading(store, schedule, holder="dead-leader")
        assert store.fire(schedule, self.T0, epoch=None, reason="standby") == "fired"
        assert [job.job_id for job in enqueued()] == [fire_job_id("tick", self.T0)]
        last = store.states()["tick"].last_fire
        assert last is not None
        assert last.reason == "standby"

    def test_an_old_epoch_cannot_fire_after_a_change_of_leader(
        self, store: SchedulerStore, enqueued: Callable[[], list[Enqueued]]
    ) -> None:
        schedule = self.make_schedule()
        old = self.leading(store, schedule, holder="a")
        store.release(old)
        new = self.leading(store, schedule, holder="b")
        assert store.fire(schedule, self.T0, epoch=old.epoch, reason="on_time") == "not_leader"
        assert enqueued() == []
        assert store.states()["tick"].last_fire is None
        assert store.fire(schedule, self.T0, epoch=new.epoch, reason="on_time") == "fired"

    def test_an_epoch_cannot_fire_once_nobody_leads(
        self, store: SchedulerStore, enqueued: Callable[[], list[Enqueued]]
    ) -> None:
        schedule = self.make_schedule()
        lease = self.leading(store, schedule)
        store.release(lease)
        assert store.fire(schedule, self.T0, epoch=lease.epoch, reason="on_time") == "not_leader"
        assert enqueued() == []

    def test_an_expired_lease_cannot_fire_with_its_epoch(
        self,
        store: SchedulerStore,
        enqueued: Callable[[], list[Enqueued]],
        pass_time: Callable[[float], None],
    ) -> None:
        schedule = self.make_schedule()
        lease = store.acquire("a", SHORT_LEASE)
        assert lease is not None
        assert store.register(lease, [schedule])
        pass_time(SHORT_LEASE + 0.1)
        assert store.fire(schedule, self.T0, epoch=lease.epoch, reason="on_time") == "not_leader"
        assert enqueued() == []
        assert store.fire(schedule, self.T0, epoch=None, reason="standby") == "fired"

    def test_a_changed_definition_is_stale(
        self, store: SchedulerStore, enqueued: Callable[[], list[Enqueued]]
    ) -> None:
        registered = self.make_schedule(every=1.0)
        changed = self.make_schedule(every=2.0)
        lease = self.leading(store, registered)
        assert store.fire(changed, self.T0, epoch=lease.epoch, reason="on_time") == "stale"
        assert store.fire(changed, self.T0, epoch=None, reason="standby") == "stale"
        assert enqueued() == []
        assert store.states()["tick"].last_fire is None

    def test_the_last_fire_record_carries_the_fingerprint_it_fired_under(
        self, store: SchedulerStore
    ) -> None:
        """FireRecord.fingerprint: the registered fingerprint the fire was made under, so a
        runner does not catch up times of a changed definition (REVIEW14 F2)."""
        first = self.make_schedule(every=1.0)
        lease = self.leading(store, first)
        assert store.fire(first, self.T0, epoch=lease.epoch, reason="on_time") == "fired"
        last = store.states(["tick"])["tick"].last_fire
        assert last is not None
        assert last.fingerprint == first.fingerprint()
        changed = self.make_schedule(every=2.0)
        assert store.register(lease, [changed])
        assert store.fire(changed, self.T0 + 2, epoch=None, reason="standby") == "fired"
        last = store.states(["tick"])["tick"].last_fire
        assert last is not None
        assert (fire_key(last.fire_time), last.fingerprint) == (
            fire_key(self.T0 + 2),
            changed.fingerprint(),
        )

    def test_a_schedule_never_registered_is_stale(
        self, store: SchedulerStore, enqueued: Callable[[], list[Enqueued]]
    ) -> None:
        lease = self.leading(store, self.make_schedule("other"))
        unknown = self.make_schedule("tick")
        assert store.fire(unknown, self.T0, epoch=lease.epoch, reason="on_time") == "stale"
        assert store.fire(unknown, self.T0, epoch=None, reason="standby") == "stale"
        assert enqueued() == []

    def test_a_removed_schedule_stops_firing(
        self, store: SchedulerStore, enqueued: Callable[[], list[Enqueued]]
    ) -> None:
        kept, removed = self.make_schedule("kept"), self.make_schedule("gone")
        lease = self.leading(store, kept, removed)
        assert store.register(lease, [kept])
        states = store.states()
        assert states["gone"].removed
        assert not states["kept"].removed
        assert store.fire(removed, self.T0, epoch=lease.epoch, reason="on_time") == "stale"
        assert store.fire(removed, self.T0, epoch=None, reason="standby") == "stale"
        assert store.fire(kept, self.T0, epoch=lease.epoch, reason="on_time") == "fired"
        assert [job.schedule for job in enqueued()] == ["kept"]
        assert store.register(lease, [kept, removed])
        assert not store.states()["gone"].removed

    def test_a_paused_schedule_fires_nothing_and_records_nothing(
        self, store: SchedulerStore, enqueued: Callable[[], list[Enqueued]]
    ) -> None:
        schedule = self.make_schedule()
        lease = self.leading(store, schedule)
        assert store.set_paused("tick", True)
        assert store.states()["tick"].paused
        assert store.fire(schedule, self.T0, epoch=lease.epoch, reason="on_time") == "paused"
        assert store.fire(schedule, self.T0, epoch=None, reason="standby") == "paused"
        assert store.states()["tick"].last_fire is None
        assert store.set_paused("tick", False)
        assert store.fire(schedule, self.T0, epoch=lease.epoch, reason="on_time") == "fired"
        assert len(enqueued()) == 1
        assert store.set_paused("unknown", True) is False

    def test_pause_survives_registration(self, store: SchedulerStore) -> None:
        schedule = self.make_schedule()
        lease = self.leading(store, schedule)
        assert store.set_paused("tick", True)
        assert store.register(lease, [schedule])
        assert store.states()["tick"].paused

    def test_a_trigger_request_is_stored_and_consumed_by_its_fire(
        self, store: SchedulerStore, enqueued: Callable[[], list[Enqueued]]
    ) -> None:
        schedule = self.make_schedule()
        lease = self.leading(store, schedule)
        at = self.T0 + 0.25  # off the schedule's grid: a manual fire has its own time
        assert store.request_trigger("tick", at)
        assert [fire_key(t) for t in store.states()["tick"].triggers] == [fire_key(at)]
        assert store.fire(schedule, at, epoch=lease.epoch, reason="manual") == "fired"
        assert store.states()["tick"].triggers == ()
        last = store.states()["tick"].last_fire
        assert last is not None
        assert last.reason == "manual"
        assert [job.job_id for job in enqueued()] == [fire_job_id("tick", at)]
        assert store.request_trigger("unknown", at) is False

    def test_states_names_known_schedules_only(self, store: SchedulerStore) -> None:
        self.leading(store, self.make_schedule("a"), self.make_schedule("b"))
        assert set(store.states()) == {"a", "b"}
        assert set(store.states(["b", "nope"])) == {"b"}

    def test_the_last_fire_is_the_latest_fire_time_whatever_the_order(
        self, store: SchedulerStore
    ) -> None:
        schedule = self.make_schedule()
        lease = self.leading(store, schedule)
        assert store.fire(schedule, self.T0 + 2, epoch=lease.epoch, reason="on_time") == "fired"
        assert store.fire(schedule, self.T0 + 1, epoch=lease.epoch, reason="catch_up") == "fired"
        last = store.states()["tick"].last_fire
        assert last is not None
        assert fire_key(last.fire_time) == fire_key(self.T0 + 2)

    def test_concurrent_fires_of_one_time_enqueue_once(
        self, store: SchedulerStore, enqueued: Callable[[], list[Enqueued]]
    ) -> None:
        schedule = self.make_schedule()
        lease = self.leading(store, schedule)
        outcomes: list[FireOutcome] = []
        start = threading.Barrier(8)

        def fire(index: int) -> None:
            start.wait()
            epoch = lease.epoch if index % 2 else None
            outcomes.append(store.fire(schedule, self.T0, epoch=epoch, reason="race"))

        threads = [threading.Thread(target=fire, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(outcomes) == sorted(["fired"] + ["already_fired"] * 7)
        assert len(enqueued()) == 1

    # -- retention --------------------------------------------------------------------------

    def test_prune_keeps_each_schedules_last_record(self, store: SchedulerStore) -> None:
        a, b = self.make_schedule("a"), self.make_schedule("b")
        lease = self.leading(store, a, b)
        for offset in (0, 1, 2):
            assert store.fire(a, self.T0 + offset, epoch=lease.epoch, reason="on_time") == "fired"
        assert store.fire(b, self.T0, epoch=lease.epoch, reason="on_time") == "fired"
        assert store.prune(lease, self.T0 + 10) == 2
        states = store.states()
        last_a, last_b = states["a"].last_fire, states["b"].last_fire
        assert last_a is not None
        assert fire_key(last_a.fire_time) == fire_key(self.T0 + 2)
        assert last_b is not None
        assert fire_key(last_b.fire_time) == fire_key(self.T0)
        # The last record stays, so its time still cannot fire again.
        assert store.fire(a, self.T0 + 2, epoch=lease.epoch, reason="on_time") == "already_fired"

    def test_prune_needs_the_live_lease(self, store: SchedulerStore) -> None:
        schedule = self.make_schedule()
        lease = self.leading(store, schedule)
        for offset in (0, 1):
            assert store.fire(schedule, self.T0 + offset, epoch=lease.epoch, reason="x") == "fired"
        store.release(lease)
        assert store.prune(lease, self.T0 + 10) == 0

    def test_the_store_clock_is_epoch_seconds(self, store: SchedulerStore) -> None:
        assert abs(store.clock() - time.time()) < 5
