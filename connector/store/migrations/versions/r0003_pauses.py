"""Destinations paused until their quota resets (table ``pauses``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "pauses",
        sa.Column("dispensary", sa.String(128), primary_key=True),
        sa.Column("destination", sa.String(128), primary_key=True),
        sa.Column("paused_until", sa.Float, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("paused_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pauses")
