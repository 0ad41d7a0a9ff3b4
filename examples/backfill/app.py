"""The expand/contract backfill: fill a new column in batches, every row exactly once.

A zero-downtime schema change goes in three releases: *expand* (add ``email_normalized``,
nullable; the new code writes it for new and changed rows), *backfill* (this job: fill it for
every existing row), *contract* (make it NOT NULL, drop what it replaces). The backfill must
survive deploys, scale-downs and crashes of the very workers that run it, and must not run a
batch twice: here ``times_backfilled`` counts how many times each row was updated, and it ends
at 1 for every row however often the workers were stopped or killed.

How: the job walks ``accounts`` by id with :func:`workerkit.batches`, and each batch's UPDATE
commits in one transaction with the cursor checkpoint (``batch.transaction()``). The accounts
live in the same PostgreSQL database as the workerkit queue, so that transaction can also hold
the queue's fenced checkpoint write:

* SIGTERM (a deploy): the job goes on until the drain deadline, then releases itself between
  two batches; the next worker resumes after the last committed batch.
* SIGKILL mid-batch (the pod dies): the database rolls the open transaction back, batch and
  cursor together; once the lease expires another worker resumes after the last committed one.
* a worker that lost its lease (it was paused past V, another worker took the job): its batch's
  fenced checkpoint write matches nothing, raises LeaseLost, and the batch rolls back.

Run it: examples/backfill/README.md.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

import workerkit
from workerkit import current_job

app = workerkit.App()
log = logging.getLogger("backfill")

metadata = sa.MetaData()

#: The table after the "expand" migration: ``email_normalized`` is new and still NULL.
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("email_normalized", sa.Text, nullable=True),
    sa.Column("times_backfilled", sa.Integer, nullable=False, server_default=sa.text("0")),
)

TASK = "backfill_email_normalized"


def fetch_ids(after: int, limit: int) -> list[int]:
    """The ids of the next ``limit`` accounts after id ``after``, in id order."""
    statement = (
        sa.select(accounts.c.id).where(accounts.c.id > after).order_by(accounts.c.id).limit(limit)
    )
    with current_job().transaction() as conn:
        return list(conn.scalars(statement))


def _account_id(account_id: int) -> int:
    return account_id  # the items are ids, and an id is its own cursor


@app.task(
    name=TASK,
    timeout=6 * 3600,
    checkpointed=True,
    # A SIGKILLed worker cannot give its attempt back (a release does), so each pod death costs
    # one. This job makes progress on every attempt and resumes from its checkpoint, so let it
    # outlive many crashes; a job that crashes its worker at once still fails after these.
    max_attempts=100,
)
def backfill_email_normalized(batch_size: int = 500, pause: float = 0.0) -> dict[str, int]:
    """Set ``email_normalized = lower(email)`` on every account, ``batch_size`` rows at a time.

    ``pause`` seconds between batches keep the load on the primary (and replication lag) low;
    the pause ends early when the worker is asked to stop.
    """
    job = current_job()
    batches = rows = 0
    for batch in workerkit.batches(fetch_ids, cursor_of=_account_id, start=0, size=batch_size):
        with batch.transaction() as conn:
            # A range, not IN (...): the same rows the batch fetched, plus any inserted since
            # inside the range (which the new code already normalizes; lower() is idempotent).
            result = conn.execute(
                sa.update(accounts)
                .where(accounts.c.id > batch.after, accounts.c.id <= batch.cursor)
                .values(
                    email_normalized=sa.func.lower(accounts.c.email),
                    times_backfilled=accounts.c.times_backfilled + 1,
                )
            )
            # The batch's cursor checkpoint is written here too, when the block ends, and
            # commits with the UPDATE above.
        batches += 1
        rows += result.rowcount
        if pause:
            job.wait_for_stop(pause)
    log.info(
        "backfill finished",
        extra={"event": "backfill_done", "batches": batches, "rows": rows, "attempt": job.attempt},
    )
    return {"batches_this_attempt": batches, "rows_this_attempt": rows}
