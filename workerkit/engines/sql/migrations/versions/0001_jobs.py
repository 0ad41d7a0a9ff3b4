"""The job table.

Revision ID: 0001
Revises:
Create Date: 2026-05-01

Frozen: this script spells the table out instead of using workerkit.engines.sql.schema, so later
changes to the metadata go into new revisions, never into this one.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workerkit_jobs",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("task", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("run_at", sa.Double(), nullable=False),
        sa.Column("enqueued_at", sa.Double(), nullable=False),
        sa.Column("lease_token", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.Double(), nullable=True),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("checkpoint", sa.Text(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.CheckConstraint(
            "state IN ('ready', 'running', 'succeeded', 'failed')",
            name="ck_workerkit_jobs_state",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_workerkit_jobs"),
    )
    ready = sa.text("state = 'ready'")
    running = sa.text("state = 'running'")
    finished = sa.text("finished_at IS NOT NULL")
    op.create_index(
        "ix_workerkit_jobs_ready",
        "workerkit_jobs",
        ["queue", "run_at"],
        postgresql_where=ready,
        sqlite_where=ready,
    )
    op.create_index(
        "ix_workerkit_jobs_lease",
        "workerkit_jobs",
        ["queue", "lease_expires_at"],
        postgresql_where=running,
        sqlite_where=running,
    )
    op.create_index(
        "ix_workerkit_jobs_finished",
        "workerkit_jobs",
        ["finished_at"],
        postgresql_where=finished,
        sqlite_where=finished,
    )


def downgrade() -> None:
    op.drop_index("ix_workerkit_jobs_finished", table_name="workerkit_jobs")
    op.drop_index("ix_workerkit_jobs_lease", table_name="workerkit_jobs")
    op.drop_index("ix_workerkit_jobs_ready", table_name="workerkit_jobs")
    op.drop_table("workerkit_jobs")
