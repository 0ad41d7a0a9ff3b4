"""Acks folded into the next claim: the sql worker's job threads hand their acks to the fetcher.

A job thread whose job succeeded offers its ack while the fetcher waits for a free slot (about to
claim), and goes on to its next job; the fetcher writes every ack offered since its last claim in
that claim's write (:meth:`SqlQueue.ack_and_claim`, fenced per job) and finishes each job by
whether its ack matched. While the fetcher is not about to claim (an empty queue, a store not
ready, a stop), offers are refused or handed back, and the ack is written by a thread of its job
(retried through an outage), as it always was.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workerkit.engines.sql.claim import Ack

__all__ = ("AckFold", "Batch")

log = logging.getLogger("workerkit.engines.sql.worker")


class Batch:
    """The acks offered since the fetcher's last claim, each with what to do once it is known
    whether the claim wrote it (the caller's thread: the fetcher's, for a claim)."""

    def __init__(self) -> None:
        self.acks: list[Ack] = []
        self._then: list[Callable[[bool | None], None]] = []
        self._lock = threading.Lock()
        self._done = False

    def add(self, ack: Ack, then: Callable[[bool | None], None]) -> None:
        self.acks.append(ack)
        self._then.append(then)

    def settled(self, matched: list[bool]) -> None:
        """Written: for each ack (in order), whether its fence matched."""
        self._finish(matched)

    def hand_back(self) -> None:
        """Not written: each ack's ``then(None)`` (then a thread of its job writes it). Nothing
        once settled."""
        self._finish([None] * len(self.acks))

    def _finish(self, matched: Sequence[bool | None]) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        for then, ok in zip(self._then, matched, strict=True):
            try:
                then(ok)
            except Exception:  # one job's bookkeeping must not keep the others' unsettled
                log.exception("settling a folded ack failed", extra={"event": "fold_failed"})


class AckFold:
    """Between the job threads (:meth:`offer`) and the fetcher (the rest). Thread-safe."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._open = False
        self._batch: Batch | None = None

    def offer(self, ack: Ack, then: Callable[[bool | None], None]) -> Batch | None:
        """Add ``ack`` to the next claim's batch, ``then`` called once it is known whether the
        claim wrote it; None when the fetcher is not about to claim (``then`` is not called)."""
        with self._lock:
            if not self._open:
                return None
            if self._batch is None:
                self._batch = Batch()
            self._batch.add(ack, then)
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
