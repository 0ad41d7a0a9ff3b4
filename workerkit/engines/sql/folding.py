"""Acks folded into the next claim: the sql worker's job threads hand their acks to the fetcher.

A job thread whose job succeeded offers its ack while the fetcher waits for a free slot (about to
claim); the fetcher writes every ack offered since its last claim in that claim's write
(:meth:`SqlQueue.ack_and_claim`, fenced per job) and tells each job thread whether its ack
matched. While the fetcher is not about to claim (an empty queue, a store not ready, a stop),
offers are refused or handed back, and the job thread writes its ack itself, as it always did.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workerkit.engines.sql.claim import Ack

__all__ = ("AckFold", "Batch")


class Batch:
    """The acks offered since the fetcher's last claim; one Event for all of them."""

    def __init__(self) -> None:
        self.acks: list[Ack] = []
        self._matched: dict[str, bool] | None = None
        self._done = threading.Event()

    def settled(self, matched: list[bool]) -> None:
        """Written: for each ack (in order), whether its fence matched."""
        self._matched = {ack.job_id: ok for ack, ok in zip(self.acks, matched, strict=True)}
        self._done.set()

    def hand_back(self) -> None:
        """Not written: each job thread writes its own ack. Nothing once settled."""
        if not self._done.is_set():
            self._matched = None
            self._done.set()

    def wait(self, job_id: str) -> bool | None:
        """Whether this job's ack matched; None when it was handed back (not written)."""
        self._done.wait()
        return None if self._matched is None else self._matched[job_id]


class AckFold:
    """Between the job threads (:meth:`offer`) and the fetcher (the rest). Thread-safe."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._open = False
        self._batch: Batch | None = None

    def offer(self, ack: Ack) -> Batch | None:
        """Add ``ack`` to the next claim's batch; None when the fetcher is not about to claim."""
        with self._lock:
            if not self._open:
                return None
            if self._batch is None:
                self._batch = Batch()
            self._batch.acks.append(ack)
            return self._batch

    def open(self) -> None:
        """The fetcher waits for a slot and claims once it has one: offers are welcome."""
        if self.enabled:
            with self._lock:
                self._open = True

    @property
    def pending(self) -> int:
        """How many acks wait for the next claim."""
        batch = self._batch
        return 0 if batch is None else len(batch.acks)

    def take(self) -> Batch | None:
        """The acks to write with this claim (the caller settles or hands back the batch)."""
        with self._lock:
            batch, self._batch = self._batch, None
        return batch

    def close(self) -> None:
        """No claim soon: refuse offers, and hand back the acks offered so far."""
        with self._lock:
            self._open = False
            batch, self._batch = self._batch, None
        if batch is not None:
            batch.hand_back()

    def close_if_empty(self) -> bool:
        """Refuse offers unless some came since :meth:`take`; whether it did."""
        with self._lock:
            if self._batch is not None:
                return False
            self._open = False
            return True
