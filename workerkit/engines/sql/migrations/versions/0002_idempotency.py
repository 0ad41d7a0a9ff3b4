"""The idempotency key table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-05-08

Frozen: this script spells the table out instead of using workerkit.engines.sql.schema, so later
changes to the metadata go into new revisions, never into this one. Additive only (a new table):
workers of the previous release keep running on the new schema during a rolling deploy.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workerkit_idempotency",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("owner_token", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("takeovers", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("claimed_at", sa.Double(), nullable=False),
        sa.Column("completed_at", sa.Double(), nullable=True),
        sa.CheckConstraint(
            "state IN ('in_progress', 'completed')",
            name="ck_workerkit_idempotency_state",
        ),
        sa.PrimaryKeyConstraint("key", name="pk_workerkit_idempotency"),
    )
    op.create_index("ix_workerkit_idempotency_expires_at", "workerkit_idempotency", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_workerkit_idempotency_expires_at", table_name="workerkit_idempotency")
    op.drop_table("workerkit_idempotency")
