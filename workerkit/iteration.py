"""Iteration helpers: a checkpointed long job written as a plain ``for`` loop.

:func:`checkpointed` (one item at a time, at least once) and :func:`batches` (with
:meth:`Batch.transaction`, exactly once) keep a keyset cursor in the job's checkpoint: they resume
from it, save it after each finished item or batch, and release the job when a stop is requested.
The tricky part is *when* an item counts as finished: when the loop asks for the next one, so a
cursor is never saved before its item is done. See docs/howto/checkpointed-jobs.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from workerkit.errors import JobError
from workerkit.job import JobContext, current_job

__all__ = ("Batch", "batches", "checkpointed")

log = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C")

#: Items fetched per call of ``fetch`` by :func:`checkpointed` unless told otherwise.
DEFAULT_PAGE_SIZE = 500

_HERE: Any = object()  # "the cursor's current position" (None may be a real cursor)


class _Cursor(Generic[C]):
    """Where the job is, read from and written to its checkpoint (whole, or under ``key``)."""

    def __init__(self, job: JobContext, start: C, key: str | None) -> None:
        self.job = job
        self.key = key
        saved = job.checkpoint
        if key is None:
            self.position: C = start if saved is None else saved
        elif isinstance(saved, dict) and key in saved:
            self.position = saved[key]
        else:
            self.position = start
        if self.position != start:
            log.info(
                "resuming from the saved cursor",
                extra={"event": "iteration_resumed", "job_id": job.job_id, "cursor": self.position},
            )

    def state(self, position: Any = _HERE) -> Any:
        """The checkpoint that records ``position`` (default :attr:`position`).

        Under ``key``, the other keys of a dict checkpoint are kept.
        """
        if position is _HERE:
            position = self.position
        if self.key is None:
            return position
        saved = self.job.checkpoint
        return {**(saved if isinstance(saved, dict) else {}), self.key: position}

    def release_if_stopping(self) -> None:
        if self.job.stop_requested:
            log.info(
                "stop requested: saving the cursor and releasing the job",
                extra={"event": "iteration_released", "job_id": self.job.job_id},
            )
            self.job.release(self.state())


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _no_progress(fetch: Callable[..., Any], after: Any) -> JobError:
    name = getattr(fetch, "__qualname__", repr(fetch))
    return JobError(
        f"{name}(after={after!r}, ...) returned items whose last cursor is {after!r} again: "
        "fetch must return only items after the cursor, in cursor order, or the job would "
        "loop forever"
    )


def checkpointed(
    fetch: Callable[[C, int], Sequence[T]],
    *,
    cursor_of: Callable[[T], C],
    start: C,
    page_size: int = DEFAULT_PAGE_SIZE,
    every: int | None = None,
    key: str | None = None,
) -> Iterator[T]:
    """Yield the items of ``fetch`` one by one, keeping the job's cursor in its checkpoint.

    ``fetch(after, limit)`` returns up to ``limit`` items that come after the cursor ``after``,
    in cursor order (keyset pagination); an empty result ends the iteration. ``cursor_of(item)``
    is the cursor once ``item`` is done (a row's id, or ``i + 1`` for the ``i``-th element of a
    list). ``start`` is the cursor of a job that has done nothing.

    The cursor of each finished item is saved through
    :meth:`~workerkit.job.JobContext.save_checkpoint`: written at least every
    ``checkpoint_interval`` seconds (F) and, with ``every=N``, every N items. When a stop is
    requested, the cursor is written and the job released before the next item. ``key`` keeps
    the cursor under that key of a dict checkpoint (other keys are kept), for a job with more
    than one loop or with state of its own.

    Must be called inside a job (:class:`~workerkit.errors.NoCurrentJob` otherwise).
    """
    _check_positive("page_size", page_size)
    _check_positive("every", every)
    cursor = _Cursor(current_job(), start, key)
    return _items(cursor, fetch, cursor_of, page_size, every)


def _items(
    cursor: _Cursor[C],
    fetch: Callable[[C, int], Sequence[T]],
    cursor_of: Callable[[T], C],
    page_size: int,
    every: int | None,
) -> Iterator[T]:
    job = cursor.job
    done = 0
    while True:
        cursor.release_if_stopping()
        after = cursor.position
        page = fetch(after, page_size)
        if not page:
            return
        for item in page:
            cursor.release_if_stopping()
            yield item
            # The loop asked for the next item, so this one is finished.
            cursor.position = cursor_of(item)
            done += 1
            job.save_checkpoint(cursor.state(), force=every is not None and done % every == 0)
        if cursor.position == after:
            raise _no_progress(fetch, after)


class Batch(Generic[T, C]):
    """One batch of :func:`batches`: its items and the cursors around it.

    ``after`` is the cursor before the batch (what ``fetch`` was called with), ``cursor`` the
    cursor once the whole batch is done (``cursor_of`` of its last item).
    """

    def __init__(
        self, job: JobContext, items: Sequence[T], after: C, cursor: C, state: Any
    ) -> None:
        self.items = items
        self.after = after
        self.cursor = cursor
        self._job = job
        self._state = state  # the checkpoint that records ``cursor``
        self._transactions = 0
        self._committed = False

    def __repr__(self) -> str:
        return f"<Batch of {len(self.items)} after={self.after!r} cursor={self.cursor!r}>"

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A transaction in the job's queue database in which this batch's cursor commits.

        Yields a SQLAlchemy connection: make the batch's writes on it. When the block ends, the
        fenced checkpoint UPDATE (this batch's cursor) runs in the same transaction, which then
        commits: the writes and the cursor are durable together, or neither is. When another
        worker took the job meanwhile, :class:`~workerkit.errors.LeaseLost` rolls everything
        back. If the block raises and the exception is caught around the ``with``, the cursor
        does not move: the next turn of the loop fetches the same batch again.

        Needs workerkit's SQL queue with the job's data in the same database
        (:class:`~workerkit.errors.ConfigurationError` otherwise).
        """
        if self._committed:
            raise JobError(
                f"{self!r} already committed with its cursor; make all of a batch's writes in "
                "one transaction, or a crash between two of them would lose the second"
            )
        self._transactions += 1
        with self._job.transaction() as connection:
            yield connection
            # Last, just before the commit: the job row stays locked (PostgreSQL) for as short
            # a time as possible, and a lease lost during the batch is still caught here.
            self._job.save_checkpoint(self._state, connection=connection)
        self._committed = True

    def save_checkpoint(self, connection: Any) -> None:
        """Write this batch's cursor inside ``connection``'s transaction, managed by the caller.

        For a transaction :meth:`transaction` does not open (your own engine on the queue's
        database, an ORM session's ``session.connection()``). Call it last, before you commit;
        the batch then counts as committed: if your commit fails, let the exception end the
        attempt.
        """
        self._job.save_checkpoint(self._state, connection=connection)
        self._committed = True


def batches(
    fetch: Callable[[C, int], Sequence[T]],
    *,
    cursor_of: Callable[[T], C],
    start: C,
    size: int,
    every: int | None = None,
    key: str | None = None,
) -> Iterator[Batch[T, C]]:
    """Yield the items of ``fetch`` in :class:`Batch` es of up to ``size``, checkpointing each.

    ``fetch``, ``cursor_of``, ``start`` and ``key`` are as for :func:`checkpointed`; each call
    ``fetch(after, size)`` makes one batch, and an empty result ends the iteration.

    Two ways to use a batch:

    * plainly (at least once): when the loop asks for the next batch, this one's cursor is
      saved like :func:`checkpointed` saves an item's (throttled by F, ``every=N`` batches);
    * transactionally (exactly once): make the batch's writes inside
      ``with batch.transaction() as conn:`` (or call :meth:`Batch.save_checkpoint` in a
      transaction of your own); the cursor commits with them and nothing more is written.

    A stop request releases the job before the next batch, with the cursor of the last batch
    done.
    """
    _check_positive("size", size)
    _check_positive("every", every)
    cursor = _Cursor(current_job(), start, key)
    return _batches(cursor, fetch, cursor_of, size, every)


def _batches(
    cursor: _Cursor[C],
    fetch: Callable[[C, int], Sequence[T]],
    cursor_of: Callable[[T], C],
    size: int,
    every: int | None,
) -> Iterator[Batch[T, C]]:
    job = cursor.job
    done = 0
    while True:
        cursor.release_if_stopping()
        after = cursor.position
        items = fetch(after, size)
        if not items:
            return
        end = cursor_of(items[-1])
        if end == after:
            raise _no_progress(fetch, after)
        state = cursor.state(end)
        batch = Batch(job, items, after, end, state)
        yield batch
        if batch._committed:
            cursor.position = end  # durable already, with the batch's writes
        elif batch._transactions:
            # The batch's transaction rolled back and the caller carried on: its writes are
            # gone, so the cursor stays where it was and the batch is fetched again.
            log.warning(
                "batch transaction did not commit; the batch will be done again",
                extra={"event": "batch_not_committed", "job_id": job.job_id},
            )
        else:
            cursor.position = end
            done += 1
            job.save_checkpoint(state, force=every is not None and done % every == 0)
