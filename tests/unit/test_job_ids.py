"""Job ids: 32 hex digits, as ``uuid4().hex`` was, in the order this process made them."""

from __future__ import annotations

import itertools
import string
from typing import TYPE_CHECKING

from workerkit import job_ids
from workerkit.job_ids import new_job_id

if TYPE_CHECKING:
    import pytest


def test_ids_are_32_hex_digits_and_sort_in_the_order_they_were_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(job_ids, "_counter", itertools.count())  # far from its wrap
    ids = [new_job_id() for _ in range(20_000)]  # many share a millisecond
    assert all(len(i) == 32 and set(i) <= set(string.hexdigits.lower()) for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_ids_of_one_millisecond_differ_in_their_random_part_across_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two processes with the same count at the same millisecond (a fork copies the count)
    still make different ids."""
    monkeypatch.setattr(job_ids.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    monkeypatch.setattr(job_ids, "_counter", itertools.count())
    first = new_job_id()
    monkeypatch.setattr(job_ids, "_counter", itertools.count())
    second = new_job_id()
    assert first[:16] == second[:16]
    assert first != second
