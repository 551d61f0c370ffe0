"""The operator's view: decisions per event, failed attempts, quarantine replay, conflict
acknowledgement and the audit table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("inbox") as batch:
        batch.add_column(sa.Column("decisions", sa.Text))
    with op.batch_alter_table("quarantine") as batch:
        batch.add_column(sa.Column("replayed_at", sa.Float))
        batch.add_column(sa.Column("replayed_event_id", sa.Integer))
    with op.batch_alter_table("conflicts") as batch:
        batch.add_column(sa.Column("acked_at", sa.Float))
        batch.add_column(sa.Column("acked_by", sa.String(255)))
    op.create_index("ix_conflicts_customer", "conflicts", ["dispensary", "customer_id"])
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("outbox_id", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("code", sa.String(64)),
        sa.Column("error", sa.Text, nullable=False),
    )
    op.create_index("ix_attempts_outbox", "attempts", ["outbox_id", "id"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("who", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit")
    op.drop_index("ix_attempts_outbox", table_name="attempts")
    op.drop_table("attempts")
    op.drop_index("ix_conflicts_customer", table_name="conflicts")
    with op.batch_alter_table("conflicts") as batch:
        batch.drop_column("acked_by")
        batch.drop_column("acked_at")
    with op.batch_alter_table("quarantine") as batch:
        batch.drop_column("replayed_event_id")
        batch.drop_column("replayed_at")
    with op.batch_alter_table("inbox") as batch:
        batch.drop_column("decisions")
