"""The drill's canary records (``workerkit drill``): one row per execution of a canary.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Frozen: this script spells the table out instead of using workerkit.engines.sql.schema, so later
changes to the metadata go into new revisions, never into this one. Additive only (a new table):
workers of the previous release keep running on the new schema during a rolling deploy.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workerkit_drill_runs",
        sa.Column("drill_id", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("enqueued_at", sa.Double(), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("ended_at", sa.Double(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("resumed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("drill_id", "run_id", name="pk_workerkit_drill_runs"),
    )


def downgrade() -> None:
    op.drop_table("workerkit_drill_runs")
