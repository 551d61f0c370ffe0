"""Scheduled reconciliation ticks claimed once per cluster (table ``schedule_ticks``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_meta = sa.table("connector_meta", sa.column("key", sa.String), sa.column("value", sa.Text))


def upgrade() -> None:
    op.create_table(
        "schedule_ticks",
        sa.Column("job", sa.String(160), primary_key=True),
        sa.Column("tick_at", sa.Float, primary_key=True),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("claimed_at", sa.Float, nullable=False),
    )
    # a connector from before Alembic (it knows versions up to 3) now refuses this store
    # instead of running against a schema it does not know; later revisions leave it at 4
    op.execute(_meta.update().where(_meta.c.key == "schema_version").values(value=sa.literal("4")))


def downgrade() -> None:
    op.execute(_meta.update().where(_meta.c.key == "schema_version").values(value=sa.literal("3")))
    op.drop_table("schedule_ticks")
