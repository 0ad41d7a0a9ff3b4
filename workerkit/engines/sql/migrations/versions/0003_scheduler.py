"""The scheduler's tables: the lease, fire records, schedule state, trigger requests.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

Frozen: this script spells the tables out instead of using workerkit.engines.sql.schema, so
later changes to the metadata go into new revisions, never into this one. Additive only (new
tables): workers of the previous release keep running on the new schema during a rolling deploy.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workerkit_scheduler_lease",
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("holder", sa.Text(), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("acquired_at", sa.Double(), nullable=True),
        sa.Column("renewed_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("namespace", name="pk_workerkit_scheduler_lease"),
    )
    op.create_table(
        "workerkit_scheduler_fires",
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("schedule", sa.Text(), nullable=False),
        sa.Column("fire_ms", sa.BigInteger(), nullable=False),
        sa.Column("fire_time", sa.Double(), nullable=False),
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=True),
        sa.Column("recorded_at", sa.Double(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint(
            "namespace", "schedule", "fire_ms", name="pk_workerkit_scheduler_fires"
        ),
    )
    op.create_table(
        "workerkit_scheduler_schedules",
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=True),
        sa.Column("task", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("paused", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("removed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("registered_at", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("namespace", "name", name="pk_workerkit_scheduler_schedules"),
    )
    op.create_table(
        "workerkit_scheduler_triggers",
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("schedule", sa.Text(), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("requested_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint(
            "namespace", "schedule", "at_ms", name="pk_workerkit_scheduler_triggers"
        ),
    )


def downgrade() -> None:
    op.drop_table("workerkit_scheduler_triggers")
    op.drop_table("workerkit_scheduler_schedules")
    op.drop_table("workerkit_scheduler_fires")
    op.drop_table("workerkit_scheduler_lease")
