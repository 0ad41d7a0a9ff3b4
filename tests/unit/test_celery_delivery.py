"""The Celery engine's release seal: the consumer's waiting BRPOP is unblocked by its client id,
and a release that cannot be sure of it puts nothing back (crash recovery will)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("celery")

from workerkit.engines.celery.delivery import in_pool, keep_written_jobs, seal


class _Ledger:
    def __init__(self, blocked: set[int], fail: bool = False) -> None:
        self.blocked = blocked
        self.fail = fail
        self.unblocked: list[int] = []

    def unblock(self, client_id: int) -> bool:
        if self.fail:
            raise ConnectionError("broker gone")
        self.unblocked.append(client_id)
        return client_id in self.blocked


def _consumer(waiting: Any) -> tuple[Any, Any]:
    channel = SimpleNamespace(_in_poll=waiting)

    def call_soon(fn: Callable[[], None]) -> None:
        fn()  # the loop thread runs it at once

    consumer = SimpleNamespace(
        controller=SimpleNamespace(hub=SimpleNamespace(call_soon=call_soon)),
        task_consumer=SimpleNamespace(channel=channel),
    )
    return consumer, channel


def _connection(client_id: int | None) -> Any:
    sock = object()
    return SimpleNamespace(_sock=sock, _workerkit_sock=sock, _workerkit_client_id=client_id)


def test_the_waiting_brpop_is_unblocked_by_the_client_id_its_connection_learned() -> None:
    connection = _connection(42)
    consumer, _ = _consumer(connection)
    ledger = _Ledger(blocked={42})
    assert seal(consumer, ledger, lambda: None, within=0.05)  # type: ignore[arg-type]
    assert ledger.unblocked == [42]


@pytest.mark.parametrize("case", ["id unknown", "reconnected since", "unblock failed", "not it"])
def test_a_release_that_cannot_unblock_the_brpop_is_not_sealed(case: str) -> None:
    connection = _connection(None if case == "id unknown" else 7)
    if case == "reconnected since":
        connection._sock = object()  # a new socket: the id learned was the old one's
    consumer, _ = _consumer(connection)
    ledger = _Ledger(blocked=set() if case == "not it" else {7}, fail=case == "unblock failed")
    assert not seal(consumer, ledger, lambda: None, within=0.05)  # type: ignore[arg-type]


def test_no_brpop_waiting_or_its_reply_read_meanwhile_is_sealed() -> None:
    consumer, channel = _consumer(None)
    assert seal(consumer, _Ledger(set()), lambda: None, within=0.05)  # type: ignore[arg-type]
    connection = _connection(None)
    consumer, channel = _consumer(connection)

    def stop_consuming() -> None:
        channel._in_poll = None  # the loop read the BRPOP's reply as the consumer was cancelled

    assert seal(consumer, _Ledger(set()), stop_consuming, within=0.05)  # type: ignore[arg-type]


def test_celerys_reconnection_flush_keeps_the_jobs_written_to_a_live_child() -> None:
    alive = SimpleNamespace(_is_alive=lambda: True)
    dead = SimpleNamespace(_is_alive=lambda: False)
    jobs = {
        1: SimpleNamespace(_accepted=True, _write_to=alive),  # running
        2: SimpleNamespace(_accepted=False, _write_to=alive),  # in the child's pipe
        3: SimpleNamespace(_accepted=False, _write_to=None),  # never written
        4: SimpleNamespace(_accepted=False, _write_to=dead),  # its child died
    }
    cache = dict(jobs)

    def flush() -> None:  # billiard's AsynPool.flush without synack: drops the unaccepted
        for key in [k for k, job in cache.items() if not job._accepted]:
            del cache[key]

    pool = SimpleNamespace(flush=flush, _pool=SimpleNamespace(_cache=cache))
    keep_written_jobs(pool)
    keep_written_jobs(pool)  # once per flush function
    pool.flush()
    assert sorted(cache) == [1, 2]
    consumer = SimpleNamespace(pool=pool)
    kept = SimpleNamespace(_apply_result=lambda: jobs[2])
    dropped = SimpleNamespace(_apply_result=lambda: jobs[3])
    jobs[2]._job, jobs[3]._job = 2, 3
    assert in_pool(consumer, kept)
    assert not in_pool(consumer, dropped)
