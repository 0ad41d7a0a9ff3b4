"""The dashboard: workers' presences, paused queues, and two partial indexes for its pages.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Frozen: this script spells the tables out instead of using workerkit.engines.sql.schema. Additive
only (two tables, two indexes over rows of small states), so workers of the previous release keep
running on the new schema during a rolling deploy. Building the indexes reads workerkit_jobs
once (on PostgreSQL writes wait meanwhile: about a second per million rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workerkit_workers",
        sa.Column("worker_id", sa.Text(), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("heartbeat_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name="pk_workerkit_workers"),
    )
    op.create_index("ix_workerkit_workers_heartbeat_at", "workerkit_workers", ["heartbeat_at"])
    op.create_table(
        "workerkit_queue_pauses",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("paused_at", sa.Double(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("queue", name="pk_workerkit_queue_pauses"),
    )
    failed = sa.text("state = 'failed'")
    op.create_index(
        "ix_workerkit_jobs_failed",
        "workerkit_jobs",
        ["queue", "finished_at", "id"],
        postgresql_where=failed,
        sqlite_where=failed,
    )
    ready = sa.text("state = 'ready'")
    op.create_index(
        "ix_workerkit_jobs_ready_task",
        "workerkit_jobs",
        ["task", "run_at"],
        postgresql_where=ready,
        sqlite_where=ready,
    )


def downgrade() -> None:
    op.drop_index("ix_workerkit_jobs_ready_task", table_name="workerkit_jobs")
    op.drop_index("ix_workerkit_jobs_failed", table_name="workerkit_jobs")
    op.drop_table("workerkit_queue_pauses")
    op.drop_index("ix_workerkit_workers_heartbeat_at", table_name="workerkit_workers")
    op.drop_table("workerkit_workers")
