"""The in-memory scheduler store held to the scheduler store contract (a ManualClock for leases)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.scheduler_contract import Enqueued, SchedulerStoreContract
from workerkit.testing import InMemorySchedulerStore, ManualClock

pytestmark = pytest.mark.unit


class TestInMemorySchedulerStore(SchedulerStoreContract):
    @pytest.fixture
    def clock(self) -> ManualClock:
        return ManualClock()

    @pytest.fixture
    def store(self, clock: ManualClock) -> InMemorySchedulerStore:
        return InMemorySchedulerStore(clock=clock)

    @pytest.fixture
    def enqueued(self, store: InMemorySchedulerStore) -> Callable[[], list[Enqueued]]:
        def read() -> list[Enqueued]:
            return [
                Enqueued(e.job_id, e.schedule, e.fire_time, e.task, e.args, e.kwargs, e.queue)
                for e in store.enqueued
            ]

        return read

    @pytest.fixture
    def pass_time(self, clock: ManualClock) -> Callable[[float], None]:
        return clock.advance


def test_an_unavailable_store_raises_store_unavailable() -> None:
    from workerkit.errors import StoreUnavailable

    store = InMemorySchedulerStore()
    store.unavailable = True
    with pytest.raises(StoreUnavailable):
        store.acquire("a", 10)
