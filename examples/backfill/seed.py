"""Create and seed ``accounts``, then enqueue the backfill; or check the result.

::

    python -m examples.backfill.seed --rows 100000          # create, seed, enqueue
    python -m examples.backfill.seed --verify               # every row updated exactly once?

The database is ``WORKERKIT_DATABASE_URL`` (the queue's; run ``workerkit db upgrade`` first).
The job has a fixed id, so enqueuing it twice is a no-op: two backfills must never run at once.
"""

from __future__ import annotations

import argparse
import sys

import sqlalchemy as sa

from examples.backfill.app import accounts, app, backfill_email_normalized, metadata
from workerkit.engines.sql import SqlQueue

JOB_ID = "backfill-accounts-email-normalized"
CHUNK = 5000


def queue_engine() -> sa.Engine:
    """The engine of the app's SQL queue: the accounts live in the same database."""
    queue = app.backend
    if not isinstance(queue, SqlQueue):
        raise SystemExit("the backfill example runs on workerkit's SQL queue")
    return queue.engine


def create_accounts(engine: sa.Engine, rows: int, *, reset: bool = False) -> None:
    """Create ``accounts`` as the expand migration leaves it, with ``rows`` rows to backfill."""
    with engine.begin() as conn:
        if reset:
            accounts.drop(conn, checkfirst=True)
        metadata.create_all(conn)
        existing = conn.scalar(sa.select(sa.func.count()).select_from(accounts))
        if existing:
            raise SystemExit(f"accounts already has {existing} rows; give --reset to start over")
        for first in range(1, rows + 1, CHUNK):
            conn.execute(
                accounts.insert(),
                [
                    {"id": i, "email": f"User.{i}@Example.COM"}
                    for i in range(first, min(first + CHUNK, rows + 1))
                ],
            )


def enqueue_backfill(batch_size: int, pause: float, job_id: str = JOB_ID) -> str:
    """Enqueue the backfill under its fixed id (a second enqueue does nothing)."""
    return backfill_email_normalized.configure(job_id=job_id).enqueue(
        batch_size=batch_size, pause=pause
    )


def times_backfilled(engine: sa.Engine) -> dict[int, int]:
    """How many rows were updated how many times: ``{times: rows}``."""
    statement = sa.select(accounts.c.times_backfilled, sa.func.count()).group_by(
        accounts.c.times_backfilled
    )
    with engine.connect() as conn:
        return {int(times): int(count) for times, count in conn.execute(statement)}


def wrongly_normalized(engine: sa.Engine) -> int:
    """Rows whose ``email_normalized`` is not ``lower(email)``."""
    statement = (
        sa.select(sa.func.count())
        .select_from(accounts)
        .where(
            sa.or_(
                accounts.c.email_normalized.is_(None),
                accounts.c.email_normalized != sa.func.lower(accounts.c.email),
            )
        )
    )
    with engine.connect() as conn:
        return int(conn.scalar(statement) or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.backfill.seed")
    parser.add_argument("--rows", type=int, default=100_000, help="accounts to create")
    parser.add_argument("--batch-size", type=int, default=500, help="rows per batch")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between batches")
    parser.add_argument("--reset", action="store_true", help="drop and recreate accounts")
    parser.add_argument("--job-id", default=JOB_ID, help="the backfill job's id")
    parser.add_argument("--verify", action="store_true", help="only check the result")
    args = parser.parse_args(argv)
    engine = queue_engine()
    if args.verify:
        counts = times_backfilled(engine)
        bad = wrongly_normalized(engine)
        job = app.backend.get_job(args.job_id) if isinstance(app.backend, SqlQueue) else None
        print(f"rows by times_backfilled: {counts}; wrongly normalized: {bad}")
        print(f"job {args.job_id}: {job['state'] if job else 'not found'}")
        return 0 if set(counts) == {1} and not bad else 1
    create_accounts(engine, args.rows, reset=args.reset)
    job_id = enqueue_backfill(args.batch_size, args.pause, args.job_id)
    print(f"seeded {args.rows} accounts; enqueued {job_id} (batches of {args.batch_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
